"""Merging concurrent calls of a batched function (the server's speech encoder calls): every caller gets its own
rows, calls really merge under concurrency, errors reach every caller of the merged call, the row cap holds."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from egstalker.audio.batching import ConcurrentBatcher


class SlowDouble:
    """fn(x) = 2x, taking 20 ms per call, recording each call's row count."""

    def __init__(self, fail_on: float | None = None):
        self.sizes: list[int] = []
        self.fail_on = fail_on
        self._lock = threading.Lock()
        self.running = 0
        self.most_running = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        time.sleep(0.02)
        with self._lock:
            self.running -= 1
            self.sizes.append(len(x))
        if self.fail_on is not None and (x == self.fail_on).any():
            raise ValueError("bad row")
        return 2 * x


def test_concurrent_callers_get_their_own_rows_from_merged_calls():
    fn = SlowDouble()
    batcher = ConcurrentBatcher(fn, max_rows=64)
    inputs = [np.full((1 + k % 3, 4), float(k)) for k in range(40)]
    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(batcher, inputs))
    for x, y in zip(inputs, outputs):
        np.testing.assert_array_equal(y, 2 * x)
    assert sum(fn.sizes) == sum(len(x) for x in inputs)
    assert fn.most_running == 1  # one call of fn at a time
    # 8 threads, 20 ms per call: most calls carry several callers' rows
    assert batcher.inputs == 40 and batcher.calls < 20 and max(fn.sizes) > 3


def test_a_lone_caller_runs_at_once_and_the_row_cap_holds():
    fn = SlowDouble()
    batcher = ConcurrentBatcher(fn, max_rows=5)
    np.testing.assert_array_equal(batcher(np.ones((2, 1))), 2 * np.ones((2, 1)))
    assert fn.sizes == [2] and batcher.calls == 1
    np.testing.assert_array_equal(batcher(np.ones((9, 1))), 2 * np.ones((9, 1)))  # larger than the cap: alone
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(batcher, [np.ones((2, 1))] * 12))
    assert max(fn.sizes[2:]) <= 5


def test_a_failing_input_fails_only_its_own_caller():
    """A merged call that fails is retried input by input: only the caller of the bad row gets the error."""
    fn = SlowDouble(fail_on=-1.0)
    batcher = ConcurrentBatcher(fn)
    inputs = [np.full((1, 2), -1.0 if k in (7, 15) else float(k)) for k in range(24)]

    def call(x):
        try:
            return batcher(x)
        except Exception as e:  # noqa: BLE001
            return e

    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(call, inputs))
    for k, y in enumerate(outputs):
        if k in (7, 15):
            assert isinstance(y, ValueError) or isinstance(y.__cause__, ValueError), y
        else:
            np.testing.assert_array_equal(y, 2 * inputs[k])
    assert max(fn.sizes) > 1  # the bad rows did ride in merged calls
    with pytest.raises(ValueError):
        batcher(np.full((1, 2), -1.0))
    np.testing.assert_array_equal(batcher(np.ones((1, 2))), 2 * np.ones((1, 2)))  # still serving


def test_a_caller_interrupted_while_waiting_leaves_the_line():
    """An exception in a waiting caller (Ctrl-C in a main thread) must not leave the callers behind it hanging."""
    fn = SlowDouble()
    batcher = ConcurrentBatcher(fn)
    release = threading.Event()

    def slow(x):
        release.wait(5)
        return 2 * x

    batcher.fn = slow
    first = threading.Thread(target=batcher, args=(np.ones((1, 1)),))
    first.start()
    time.sleep(0.05)  # the first call runs (blocked in fn)

    class Interrupt(BaseException):
        pass

    waiting = batcher._changed.wait
    calls = {"n": 0}

    def interrupted_wait(*args, **kwargs):
        calls["n"] += 1
        raise Interrupt

    batcher._changed.wait = interrupted_wait
    with pytest.raises(Interrupt):
        batcher(np.ones((1, 1)))
    batcher._changed.wait = waiting
    assert calls["n"] == 1 and batcher._queue == []
    release.set()
    first.join(5)
    batcher.fn = fn
    np.testing.assert_array_equal(batcher(np.full((2, 1), 3.0)), np.full((2, 1), 6.0))  # not hanging
