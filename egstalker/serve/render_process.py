"""Rendering in a child process with its own interpreter lock.

Inside the server process the render thread gives up the GIL around each of the ~200 ops a render call
dispatches and must take it back from the event loop and the JPEG and speech-feature threads; on an H200 a
7-frame call took 28 ms inside the server against about 15 ms alone (docs/gpu.md). A child process renders
with a GIL of its own: the server sends each batch's inputs (feature rows and indices, kilobytes) through a
pipe and gets the frames back as uint8 arrays.

    >>> head = ProcessHead.start("models/lieu", device="cuda")   # a CPU copy here, the device copy in the child
    >>> frames = head.render_frames(features, rows, poses)       # [B, H, W, 3] uint8, rendered in the child
    >>> head.close()
"""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from egstalker.errors import EgstalkerError

RENDER_TIMEOUT_S = 120.0
"""A render call that takes longer than this is taken for a hung device: the render process is killed."""


def _child(conn, model_dir: str, device: str, dataset_dir: str | None, precision: str,
           warm_up_sizes: tuple[int, ...]) -> None:
    """The render process: load the head on `device`, warm it up, then answer render requests until told to
    stop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides when to stop
    try:
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
        try:
            frames = head.render_frames(*message)
            conn.send(("ok", frames, _memory(device)))
        except Exception as e:  # noqa: BLE001 - this batch fails, the process keeps serving
            conn.send(("error", f"{e.__class__.__name__}: {e}"))


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
    window, encoder, poses) is read from a CPU copy of the same model folder loaded in this process."""

    def __init__(self, local_head, process, conn, memory: dict, warm_up_seconds: float = 0.0):
        self._head = local_head
        self._process = process
        self._conn = conn
        self._lock = threading.Lock()  # one request on the pipe at a time
        self._broken: str | None = None
        """Why the render process can no longer be used (it died, hung, or the pipe lost its place)."""
        self.device_memory = memory
        """Device memory of the render process, as of its last answer (served in /health)."""
        self.warm_up_seconds = warm_up_seconds
        """How long the render process's warm-up took (TalkingHead.warm_up)."""

    @classmethod
    def start(cls, model_dir: str | Path, device: str = "cuda", dataset_dir: str | Path | None = None,
              precision: str = "fp32", warm_up_sizes: Sequence[int] = (),
              start_timeout_s: float = 600.0, audio_weights: str | Path | None = None) -> "ProcessHead":
        """Load the model here (CPU, for its metadata) and start the render process on `device`, which loads
        the torso images and renders a throwaway batch of each of `warm_up_sizes` before it answers. The audio
        encoder runs here, on `device` too: a speech model (whisper) on the CPU would take a core per few streams.

        Raises EgstalkerError when the model cannot be loaded or the process does not come up in time.
        """
        from egstalker.inference import TalkingHead, resolve_precision

        precision = resolve_precision(precision, device)  # the render device's, not this CPU copy's
        local = TalkingHead.from_dir(model_dir, device="cpu", dataset_dir=dataset_dir, precision=precision,
                                     audio_weights=audio_weights, encoder_device=device)
        # spawn, not fork: the child initialises CUDA itself and shares nothing it could inherit half-made
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=_child, name="egs-render", daemon=True,
                                  args=(child, str(model_dir), str(device),
                                        None if dataset_dir is None else str(dataset_dir), precision,
                                        tuple(int(n) for n in warm_up_sizes)))
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
            raise
        return cls(local, process, parent, answer[1], answer[2])

    @property
    def healthy(self) -> bool:
        """Whether the render process can still render (shown as /health's status)."""
        return self._broken is None and self._process.is_alive()

    def _fail(self, reason: str) -> EgstalkerError:
        """Give the render process up: kill it (its pipe may be out of step) and say why, for every later call."""
        self._broken = reason
        if self._process.is_alive():
            self._process.kill()
        self._process.join(5)
        return EgstalkerError(f"{reason}; restart the server")

    def __getattr__(self, name):
        return getattr(self._head, name)

    def render_frames(self, features: np.ndarray, frame_indices, pose_indices, background=None) -> np.ndarray:
        """As TalkingHead.render_frames, rendered by the child process (no custom background)."""
        if background is not None:
            raise EgstalkerError("a custom background is not supported by the render process")
        with self._lock:
            if self._broken is not None:
                raise EgstalkerError(f"{self._broken}; restart the server")
            try:
                self._conn.send((np.ascontiguousarray(features), np.asarray(frame_indices, np.int64),
                                 np.asarray(pose_indices, np.int64)))
                if not self._conn.poll(RENDER_TIMEOUT_S):
                    raise self._fail(f"the render process did not answer within {RENDER_TIMEOUT_S:.0f} s")
                answer = self._conn.recv()
            except (EOFError, BrokenPipeError, OSError):
                self._process.join(1)
                raise self._fail(f"the render process has stopped (exit code {self._process.exitcode})") from None
            except EgstalkerError:
                raise
            except BaseException as e:  # the reply may still be in the pipe: never read it as the next one's
                raise self._fail(f"the render process pipe failed ({e.__class__.__name__})") from e
        if answer[0] != "ok":
            raise EgstalkerError(f"rendering failed in the render process: {answer[1]}")
        self.device_memory = answer[2]
        return answer[1]

    def close(self) -> None:
        """Stop the render process (after the call in flight, if it ends within the render timeout)."""
        if self._lock.acquire(timeout=RENDER_TIMEOUT_S):
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            finally:
                self._lock.release()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()


__all__ = ["ProcessHead"]
