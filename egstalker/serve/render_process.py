"""Rendering in a child process with its own interpreter lock.

Inside the server process the render thread gives up the GIL around each of the ~200 ops a render call
dispatches and must take it back from the event loop and the JPEG and speech-feature threads; on an H200 a
7-frame call took 28 ms inside the server against about 15 ms alone (docs/gpu.md). A child process renders
with a GIL of its own: the server sends each batch's inputs (feature rows and indices, kilobytes) through a
pipe, and the child writes the uint8 frames into shared memory and answers with their count.

Up to `queue_depth` calls wait at the child at once (2 by default), so the device starts the next batch as
soon as one ends instead of idling while the server takes the answer, schedules and sends the next request.
The shared memory holds queue_depth + 1 slots of max_batch frames: a slot is read back before its reuse.

    >>> head = ProcessHead.start("models/lieu", device="cuda")   # a CPU copy here, the device copy in the child
    >>> frames = head.render_frames(features, rows, poses)       # [B, H, W, 3] uint8, rendered in the child
    >>> head.close()
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future
from multiprocessing import shared_memory
from pathlib import Path
from typing import Sequence

import numpy as np

from egstalker.errors import EgstalkerError

RENDER_TIMEOUT_S = 120.0
"""A render call that takes longer than this is taken for a hung device: the render process is killed."""
QUEUE_DEPTH = 2
"""Render calls waiting at the render process at once (serve --render-queue)."""


def _child(conn, model_dir: str, device: str, dataset_dir: str | None, precision: str,
           warm_up_sizes: tuple[int, ...], frames_name: str, slots_shape: tuple[int, ...]) -> None:
    """The render process: load the head on `device`, warm it up, then answer render requests until told to
    stop. A batch that fits a slot is written into the shared frames; a larger one travels in the answer."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides when to stop
    try:
        # the server owns and unlinks the shared frames; a spawned child shares its resource tracker, so
        # attaching here registers nothing new
        frames_memory = shared_memory.SharedMemory(name=frames_name)
        slots = np.ndarray(slots_shape, np.uint8, buffer=frames_memory.buf)
        from egstalker.inference import TalkingHead

        head = TalkingHead.from_dir(model_dir, device=device, dataset_dir=dataset_dir, check_encoder=False,
                                    precision=precision)
        head.preload_torso()
        warm_up_s = head.warm_up(warm_up_sizes)
    except EgstalkerError as e:  # says itself what went wrong
        conn.send(("error", str(e)))
        return
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{e.__class__.__name__}: {e}"))
        return
    conn.send(("ready", _memory(device), warm_up_s))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the server went away
            return
        if message is None:
            return
        seq, features, frame_indices, pose_indices = message
        try:
            start = time.perf_counter()
            if len(frame_indices) <= slots.shape[1]:
                head.render_frames(features, frame_indices, pose_indices,
                                   out=slots[seq % len(slots), :len(frame_indices)])
                frames = len(frame_indices)
            else:
                frames = head.render_frames(features, frame_indices, pose_indices)
            conn.send(("ok", seq, frames, _memory(device), time.perf_counter() - start))
        except Exception as e:  # noqa: BLE001 - this batch fails, the process keeps serving
            conn.send(("error", seq, f"{e.__class__.__name__}: {e}"))


def _memory(device: str) -> dict:
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return {}
    return {"gpu_memory_mb": round(torch.cuda.memory_allocated(dev) / 2**20, 1),
            "gpu_peak_memory_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1),
            "gpu_name": torch.cuda.get_device_name(dev)}


class ProcessHead:
    """A TalkingHead whose `render_frames` runs in a child process; every other attribute (size, fps, audio
    window, encoder, poses) is read from a CPU copy of the same model folder loaded in this process.

    `render_frames` may be called from up to `queue_depth` threads at once: their calls queue at the child in
    the order they were sent, and a reader thread hands each answer to its caller."""

    def __init__(self, local_head, process, conn, memory: dict, warm_up_seconds: float,
                 frames_memory: shared_memory.SharedMemory, slots: np.ndarray, queue_depth: int):
        self._head = local_head
        self._process = process
        self._conn = conn
        self._frames_memory = frames_memory
        self._slots = slots
        self.queue_depth = int(queue_depth)
        """Render calls that may wait at the render process at once (the server renders from as many threads)."""
        self._send_lock = threading.Lock()  # one request on the pipe at a time (a large one may block in send)
        self._state_lock = threading.Lock()  # _pending, _seq, _broken: never held while the pipe blocks
        self._room = threading.BoundedSemaphore(self.queue_depth)  # also keeps a slot from reuse while unread
        self._pending: collections.deque[tuple[int, Future, float]] = collections.deque()
        self._seq = 0
        self._closing = False
        self._broken: str | None = None
        """Why the render process can no longer be used (it died, hung, or the pipe lost its place)."""
        self.device_memory = memory
        """Device memory of the render process, as of its last answer (served in /health)."""
        self.warm_up_seconds = warm_up_seconds
        """How long the render process's warm-up took (TalkingHead.warm_up)."""
        self.render_log: collections.deque = collections.deque(maxlen=2000)
        """(time answered, seconds the child spent rendering) of recent calls: how busy the device is."""
        self._reader = threading.Thread(target=self._read_answers, name="egs-render-answers", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, model_dir: str | Path, device: str = "cuda", dataset_dir: str | Path | None = None,
              precision: str = "fp32", warm_up_sizes: Sequence[int] = (), max_batch: int = 32,
              queue_depth: int = QUEUE_DEPTH, start_timeout_s: float = 600.0,
              audio_weights: str | Path | None = None, encoder_device: str | None = None) -> "ProcessHead":
        """Load the model here (CPU, for its metadata) and start the render process on `device`, which loads
        the torso images and renders a throwaway batch of each of `warm_up_sizes` before it answers. The audio
        encoder runs here, on `encoder_device` (default `device`: a speech model (whisper) on the CPU takes a core
        per few streams).
        Batches of up to `max_batch` frames come back through shared memory, larger ones through the pipe.

        Raises EgstalkerError when the model cannot be loaded or the process does not come up in time.
        """
        from egstalker.inference import TalkingHead, resolve_precision

        if queue_depth < 1 or max_batch < 1:
            raise EgstalkerError(f"the render queue depth ({queue_depth}) and batch ({max_batch}) must be at least 1")
        precision = resolve_precision(precision, device)  # the render device's, not this CPU copy's
        local = TalkingHead.from_dir(model_dir, device="cpu", dataset_dir=dataset_dir, precision=precision,
                                     audio_weights=audio_weights, encoder_device=encoder_device or device)
        slots_shape = (queue_depth + 1, int(max_batch), local.height, local.width, 3)
        _check_shared_memory(int(np.prod(slots_shape)))
        frames_memory = shared_memory.SharedMemory(create=True, size=int(np.prod(slots_shape)))
        slots = np.ndarray(slots_shape, np.uint8, buffer=frames_memory.buf)
        # spawn, not fork: the child initialises CUDA itself and shares nothing it could inherit half-made
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=_child, name="egs-render", daemon=True,
                                  args=(child, str(model_dir), str(device),
                                        None if dataset_dir is None else str(dataset_dir), precision,
                                        tuple(int(n) for n in warm_up_sizes), frames_memory.name, slots_shape))
        process.start()
        child.close()
        try:
            if not parent.poll(start_timeout_s):
                raise EgstalkerError(f"the render process did not load the model within {start_timeout_s:.0f} s")
            try:
                answer = parent.recv()
            except EOFError:
                process.join(5)
                raise EgstalkerError(f"the render process exited while loading the model (exit code "
                                     f"{process.exitcode})") from None
            if answer[0] != "ready":
                raise EgstalkerError(f"the render process failed to start: {answer[1]}")
        except BaseException:
            parent.close()
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
            slots = None  # the array's view of the buffer must go before the buffer can close
            frames_memory.close()
            frames_memory.unlink()
            raise
        return cls(local, process, parent, answer[1], answer[2], frames_memory, slots, queue_depth)

    @property
    def healthy(self) -> bool:
        """Whether the render process can still render (shown as /health's status)."""
        return self._broken is None and self._process.is_alive()

    def __getattr__(self, name):
        return getattr(self._head, name)

    def render_frames(self, features: np.ndarray, frame_indices, pose_indices, background=None) -> np.ndarray:
        """As TalkingHead.render_frames, rendered by the child process (no custom background)."""
        if background is not None:
            raise EgstalkerError("a custom background is not supported by the render process")
        self._room.acquire()
        future: Future = Future()
        with self._send_lock:
            with self._state_lock:
                if self._broken is not None:
                    self._room.release()
                    raise EgstalkerError(f"{self._broken}; restart the server")
                seq = self._seq
                self._seq += 1
                self._pending.append((seq, future, time.monotonic()))
            try:
                self._conn.send((seq, np.ascontiguousarray(features), np.asarray(frame_indices, np.int64),
                                 np.asarray(pose_indices, np.int64)))
            except (BrokenPipeError, OSError):
                pass  # the reader sees the process gone and fails this call with the others
        return future.result()

    def _read_answers(self) -> None:
        """Hand each answer to its caller, in the order the calls were sent; fail them all when the process
        dies, hangs or answers out of step, or when this thread itself fails."""
        try:
            while self._read_one():
                pass
        except BaseException as e:  # noqa: BLE001 - no caller may be left waiting for an answer
            self._fail_all(f"the render process's answers could not be read ({e.__class__.__name__}: {e})")

    def _read_one(self) -> bool:
        """Wait for and deliver one answer; False when reading is over."""
        try:
            ready = self._conn.poll(0.5)
        except (OSError, EOFError):
            ready = True  # recv below says what happened
        if not ready:
            with self._state_lock:
                oldest = self._pending[0][2] if self._pending else None
            if oldest is not None and time.monotonic() - oldest > RENDER_TIMEOUT_S:
                self._fail_all(f"the render process did not answer within {RENDER_TIMEOUT_S:.0f} s")
                return False
            return True
        try:
            answer = self._conn.recv()
        except (EOFError, OSError):
            if self._closing:
                self._fail_all("the render process was closed")  # a no-op unless close() gave up waiting
            else:
                self._process.join(1)
                self._fail_all(f"the render process has stopped (exit code {self._process.exitcode})")
            return False
        with self._state_lock:
            seq, future, _ = self._pending.popleft() if self._pending else (None, None, 0.0)
        if future is None or answer[1] != seq:  # out of step: no later answer can be trusted
            if future is not None:
                future.set_exception(EgstalkerError("the render process answered out of order; restart the server"))
                self._room.release()
            self._fail_all("the render process answered out of order")
            return False
        if answer[0] == "ok":
            frames = answer[2]
            if isinstance(frames, int):  # in a shared slot, which the next calls may reuse: copy it out
                frames = self._slots[seq % len(self._slots), :frames].copy()
            self.device_memory = answer[3]
            self.render_log.append((time.monotonic(), answer[4]))
            future.set_result(frames)
        else:
            future.set_exception(EgstalkerError(f"rendering failed in the render process: {answer[2]}"))
        self._room.release()
        return True

    def _fail_all(self, reason: str) -> None:
        """Give the render process up: kill it (its pipe may be out of step) and fail every waiting call."""
        with self._state_lock:
            self._broken = self._broken or reason
            pending = list(self._pending)
            self._pending.clear()
        if self._process.is_alive():
            self._process.kill()
        self._process.join(5)
        for _, future, _ in pending:
            future.set_exception(EgstalkerError(f"{reason}; restart the server"))
            self._room.release()

    def close(self) -> None:
        """Stop the render process (after the calls in flight, if they end within the render timeout) and free
        the shared frames; later calls fail at once."""
        deadline = time.monotonic() + RENDER_TIMEOUT_S
        while self._pending and self._broken is None and time.monotonic() < deadline:
            time.sleep(0.01)
        self._closing = True
        with self._send_lock:
            with self._state_lock:
                self._broken = self._broken or "the render process was closed"
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._reader.join(5)
        self._conn.close()
        self._slots = None
        self._frames_memory.close()
        self._frames_memory.unlink()


def _check_shared_memory(size: int) -> None:
    """Fail clearly, before the render process starts, when /dev/shm cannot hold the shared frames (Docker gives
    containers 64 MB by default; a 512 px stream at batch 32 with a queue of 2 needs 75 MB): pages are only taken
    when first written, so running out would kill the render process mid-stream."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:  # no /dev/shm (not Linux): the platform's shared memory has no such small default
        return
    free = stat.f_bavail * stat.f_frsize
    if free < size:
        raise EgstalkerError(f"the render process needs {size / 2**20:.0f} MB of shared memory for its frames but "
                             f"/dev/shm has {free / 2**20:.0f} MB free; give it more (docker run --shm-size=1g) or "
                             "lower --max-batch or --render-queue")


__all__ = ["ProcessHead", "QUEUE_DEPTH"]
