"""Merging concurrent calls of a batched function into one call (dynamic batching).

A server encodes the speech of every live session in worker threads, each a few 2.4 s windows at a time. On a GPU
each call is many small kernel launches under the GIL and a slice of device time taken from the render process;
merged, 24 sessions cost a few calls per 200 ms instead of 24 (docs/gpu.md, "the speech encoder's calls").
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np


class _Call:
    __slots__ = ("inputs", "result", "error", "finished")

    def __init__(self, inputs: np.ndarray):
        self.inputs = inputs
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None
        self.finished = False


class ConcurrentBatcher:
    """Call `fn` on the concatenation (along axis 0) of the arrays that threads pass at about the same time.

    The first caller runs `fn` on its own input at once; callers that arrive meanwhile queue, and when it is done
    the oldest of them runs one call for all the queued inputs (up to `max_rows` rows), and so on. Each caller
    gets the rows of its own input back (or the call's exception). No thread of its own, no added delay.

    Args:
        fn: maps an array [n, ...] to an array [n, ...], row for row (rows must not depend on each other).
        max_rows: most rows in one merged call (bounds its memory); a larger single input still runs alone.
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_rows: int = 256):
        self.fn = fn
        self.max_rows = int(max_rows)
        self._changed = threading.Condition()
        self._queue: list[_Call] = []
        self._busy = False
        self.calls = 0
        """Merged calls made so far."""
        self.inputs = 0
        """Inputs served so far (inputs / calls: how many were merged per call)."""

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        call = _Call(inputs)
        with self._changed:
            self._queue.append(call)
            # wait until served by another caller's merged call, or until first in line with fn free
            while not call.finished and (self._busy or self._queue[0] is not call):
                self._changed.wait()
            if not call.finished:
                self._busy = True
                batch, rows = [], 0
                while self._queue and (not batch or rows + len(self._queue[0].inputs) <= self.max_rows):
                    batch.append(self._queue.pop(0))
                    rows += len(batch[-1].inputs)
        if not call.finished:
            self._run(batch)
        if call.error is not None:
            raise call.error
        return call.result

    def _run(self, batch: list[_Call]) -> None:
        results, error = [], None
        try:
            merged = batch[0].inputs if len(batch) == 1 else np.concatenate([c.inputs for c in batch])
            out = self.fn(merged)
            if len(out) != len(merged):
                raise RuntimeError(f"a batched call returned {len(out)} rows for {len(merged)}")
            start = 0
            for c in batch:
                results.append(out[start:start + len(c.inputs)])
                start += len(c.inputs)
        except BaseException as e:  # noqa: BLE001 - every caller of this merged call gets the error
            error = e
        with self._changed:
            for k, c in enumerate(batch):
                c.result, c.error, c.finished = (None, error, True) if error is not None else (results[k], None, True)
            self.calls += 1
            self.inputs += len(batch)
            self._busy = False
            self._changed.notify_all()
