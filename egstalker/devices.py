"""The torch device a command runs on, from its `--device` flag: one check for every command."""

from __future__ import annotations

from egstalker.errors import EgstalkerError


def resolve_device(value: str | None, flag: str = "--device") -> str:
    """None or 'auto': cuda when this PyTorch sees a GPU, else cpu. Any other value must be cpu or a CUDA device
    this PyTorch can use; raises EgstalkerError (one line) otherwise."""
    import torch

    if value in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise EgstalkerError(f"{flag} {value!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # mps, xpu...: the rasterizers and the tests cover these two
        raise EgstalkerError(f"{flag} {value}: egstalker runs on cpu or cuda (an NVIDIA GPU), not on "
                             f"{device.type}; use {flag} cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EgstalkerError(f"{flag} {value} was asked for but this PyTorch sees no CUDA GPU; use {flag} cpu "
                                 "(or install a CUDA build of torch)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise EgstalkerError(f"{flag} {value}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return value
