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


def test_an_error_reaches_every_caller_of_its_merged_call_and_no_other():
    fn = SlowDouble(fail_on=-1.0)
    batcher = ConcurrentBatcher(fn)
    inputs = [np.full((1, 2), -1.0 if k == 7 else float(k)) for k in range(24)]

    def call(x):
        try:
            return batcher(x)
        except ValueError:
            return None

    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(call, inputs))
    assert outputs[7] is None
    failed = [k for k, y in enumerate(outputs) if y is None]
    ok = [k for k, y in enumerate(outputs) if y is not None]
    assert len(ok) >= 12  # only the merged call that held the bad row failed
    for k in ok:
        np.testing.assert_array_equal(outputs[k], 2 * inputs[k])
    assert len(failed) <= 8
    with pytest.raises(ValueError):
        batcher(np.full((1, 2), -1.0))
    np.testing.assert_array_equal(batcher(np.ones((1, 2))), 2 * np.ones((1, 2)))  # still serving
