"""What autograd keeps between a training step's forward and backward passes, counted on the CPU.

Counts the bytes of the distinct tensors autograd saves (torch.autograd.graph.saved_tensors_hooks) for:
  - the per-Gaussian deformation network on B frames x N Gaussians, its activations kept and recomputed in the
    backward pass (`DeformationNetwork.recompute_in_backward`);
  - the VGG16 perceptual term on B frames at S px, prediction and target in one autograd pass (before
    2026-12-04) and the target apart without autograd (now; random convolution weights: the counts do not
    depend on them).
The GPU peaks these lead to: benchmarks/train_memory_gpu.py.

Run: python benchmarks/activation_memory_cpu.py [--gaussians 150000] [--frames 4] [--size 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def saved_gib(fn) -> float:
    """GiB of the distinct storages autograd saves while `fn` runs its forward pass."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gaussians", type=int, default=150000)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    from egstalker.model.deformation import DeformationNetwork
    from egstalker.model.hexplane import TriPlaneField

    torch.manual_seed(0)
    b, n = args.frames, args.gaussians
    net = DeformationNetwork(TriPlaneField(torch.zeros(3), torch.ones(3), 32, (64, 128)), (512,), 8).train()
    means = torch.rand(n, 3) - 0.5
    audio, au45, viewmats = torch.randn(b, 8, 512), torch.rand(b), torch.eye(4).expand(b, 4, 4).clone()
    for recompute in (False, True):
        net.recompute_in_backward = recompute
        gib = saved_gib(lambda: net(net.spatial_cache(means), net.tokens(audio, au45, viewmats)))
        print(f"deformation network, {b} frames x {n} Gaussians, activations "
              f"{'recomputed' if recompute else 'kept'}: {gib:.2f} GiB saved")

    convs, channels = [], 3
    for block in VGG_BLOCKS:
        for out in block:
            convs.append(nn.Conv2d(channels, out, 3, padding=1).requires_grad_(False))
            channels = out

    def vgg(x):
        outputs, i = [], 0
        for k, block in enumerate(VGG_BLOCKS):
            if k:
                x = F.max_pool2d(x, 2, 2)
            for _ in block:
                x = F.relu(convs[i](x))
                i += 1
            outputs.append(x)
        return outputs

    pred = torch.rand(b, 3, args.size, args.size, requires_grad=True)
    target = torch.rand(b, 3, args.size, args.size)
    print(f"VGG16 term, {b} frames at {args.size} px, prediction and target in one pass: "
          f"{saved_gib(lambda: vgg(torch.cat([pred, target]))):.2f} GiB saved")
    print(f"VGG16 term, {b} frames at {args.size} px, the prediction alone (the target without autograd): "
          f"{saved_gib(lambda: vgg(pred)):.2f} GiB saved")


if __name__ == "__main__":
    main()
