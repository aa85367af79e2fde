"""Merging concurrent calls of a batched function into one call (dynamic batching).

A server encodes the speech of every live session in worker threads, each a few 2.4 s windows at a time. On a GPU
each call is many small kernel launches under the GIL and a slice of device time taken from the render process;
merged, the sessions' calls take fewer (1.1-2.9 sessions' calls per call at 24-40 streams on an H200, which raised
the streams served from 28 to 36: docs/gpu.md, "the speech encoder's calls").
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
    gets the rows of its own input back. When a merged call fails, its inputs are run again one by one, so only a
    caller whose own input fails gets an exception (another thread's exception is raised as a RuntimeError from
    it). No thread of its own, no added delay.

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
            try:
                # wait until served by another caller's merged call, or until first in line with fn free
                while not call.finished and (self._busy or self._queue[0] is not call):
                    self._changed.wait()
            except BaseException:  # interrupted while waiting: leave the line, or the callers behind would hang
                if not call.finished:
                    self._queue.remove(call)
                    self._changed.notify_all()
                raise
            if call.finished:
                lead = None
            else:
                self._busy = True
                lead, rows = [], 0
                while self._queue and (not lead or rows + len(self._queue[0].inputs) <= self.max_rows):
                    lead.append(self._queue.pop(0))
                    rows += len(lead[-1].inputs)
        if lead is not None:
            try:
                self._run(lead)
            finally:
                with self._changed:
                    for c in lead:
                        if not c.finished:  # _run itself was interrupted
                            c.error, c.finished = RuntimeError("a merged call was interrupted"), True
                    self._busy = False
                    self._changed.notify_all()
        if call.error is not None:
            if lead is not None:
                raise call.error
            # another thread's exception: raised afresh here, so its traceback is not shared between threads
            raise RuntimeError(f"{call.error.__class__.__name__}: {call.error}") from call.error
        return call.result

    def _run(self, batch: list[_Call]) -> None:
        """One call of fn for the batch; when a merged call fails, each input again alone, so one bad input (or
        a batch too large for the device) fails only its own caller."""
        outputs, error = None, None
        try:
            outputs = self._split(batch)
        except Exception as e:  # noqa: BLE001 - handed to the callers
            error = e
        if error is not None and len(batch) > 1:
            for c in batch:
                try:
                    c.result = self._split([c])[0]
                except Exception as e:  # noqa: BLE001 - handed to its caller
                    c.error = e
                c.finished = True
        else:
            for k, c in enumerate(batch):
                c.result, c.error = (None, error) if error is not None else (outputs[k], None)
                c.finished = True
        with self._changed:
            self.calls += 1
            self.inputs += len(batch)

    def _split(self, batch: list[_Call]) -> list[np.ndarray]:
        merged = batch[0].inputs if len(batch) == 1 else np.concatenate([c.inputs for c in batch])
        out = self.fn(merged)
        if len(out) != len(merged):
            raise RuntimeError(f"a batched call returned {len(out)} rows for {len(merged)}")
        starts = np.cumsum([0] + [len(c.inputs) for c in batch])
        return [out[a:b] for a, b in zip(starts[:-1], starts[1:])]
