"""Copies of frozen weights per training step under bf16 autocast, before and after storing the
frozen conv/linear weights in bf16 (``xmask3d.network.precision``), and whether the results match.

The 2D branch of the model (frozen SD UNet + VAE + CLIP image tower, with the trainable heads)
runs forward and backward under ``torch.autocast(<device>, bfloat16)``, as the training step runs
it with ``TrainConfig.amp``. Counted per step with a dispatch mode: every ``aten::_to_copy``, those
of frozen weights, and the bytes those write. On CPU the counts are those a GPU step makes (both
autocast policies cast convolutions and linear layers); the time is CPU bf16 time, not a GPU
figure. With ``--device cuda`` the same script times the step on the GPU.

    .venv/bin/python benchmarks/bench_frozen_casts.py --preset tiny
    .venv/bin/python benchmarks/bench_frozen_casts.py --preset paper --views 1   # random weights
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xmask3d.network.config import preset as model_preset
from xmask3d.network.config import text_dim
from xmask3d.network.model import build_model
from xmask3d.network.precision import FrozenWeights, frozen_matmul_weights


class CopyCounter(TorchDispatchMode):
    """Per ``aten::_to_copy``: counted, and whether its input is one of the watched tensors."""

    def __init__(self, watched: list[torch.Tensor]):
        super().__init__()
        self.watched = {t.data_ptr() for t in watched}
        self.copies = 0
        self.frozen_copies = 0
        self.frozen_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            self.copies += 1
            if args[0].data_ptr() in self.watched:
                self.frozen_copies += 1
                self.frozen_bytes += out.numel() * out.element_size()
        return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def branch_step(model, images: torch.Tensor, g3: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Forward + backward of the 2D branch under bf16 autocast -> outputs and gradients."""
    model.zero_grad(set_to_none=True)
    g3 = g3.detach().requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model.mask_generator(images, g3)
        clip = model.clip.mask_embed(images, out["pred_masks"].detach())
    (out["pred_masks"].float().square().mean() + out["mask_embed"].float().square().mean()).backward()
    grads = [p.grad for p in model.mask_generator.parameters() if p.grad is not None]
    return [out["pred_masks"].detach(), out["mask_embed"].detach(), clip, g3.grad, *grads]


def measure(model, images, g3, device, frozen, steps: int) -> dict[str, Any]:
    """One counted step, then `steps` timed ones (wall and process CPU time, median)."""
    with CopyCounter(frozen) as counter:
        result = branch_step(model, images, g3, device)
    synchronize(device)
    walls, cpus = [], []
    for _ in range(steps):
        start, cpu = time.perf_counter(), time.process_time()
        branch_step(model, images, g3, device)
        synchronize(device)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return {"copies": counter.copies, "frozen_copies": counter.frozen_copies,
            "frozen_copy_mib": counter.frozen_bytes / 2**20,
            "step_s": sorted(walls)[len(walls) // 2] if walls else None,
            "step_cpu_s": sorted(cpus)[len(cpus) // 2] if cpus else None,
            "result": [t.detach().clone() for t in result]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="tiny|small|paper (random weights)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the counted one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dim = text_dim(model_preset(args.preset).text_encoder)
    model = build_model(args.preset, dim).to(device).train()
    frozen = frozen_matmul_weights(model)
    h, w = model.cfg.mask_generator.image_size
    images = torch.rand(args.views, 3, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    g3 = torch.randn(args.views, dim, generator=torch.Generator().manual_seed(2)).to(device)
    branch_step(model, images, g3, device)  # warm-up (allocator, kernels)
    before = measure(model, images, g3, device, frozen, args.steps)
    with FrozenWeights(model, torch.bfloat16).lowered() as cast:
        after = measure(model, images, g3, device, frozen, args.steps)
    identical = all(torch.equal(a, b) for a, b in zip(before.pop("result"), after.pop("result"), strict=True))
    frozen_mib = sum(p.numel() * 4 for p in frozen) / 2**20
    report = {"preset": args.preset, "device": str(device), "views": args.views, "image_size": [h, w],
              "frozen_matmul_tensors": len(frozen), "cast_tensors": cast,
              "frozen_matmul_fp32_mib": frozen_mib,
              "before": before, "after": after, "bit_identical": identical,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "load": os.getloadavg()}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    print(f"preset {args.preset} on {device}, {args.views} views at {h}x{w}, bf16 autocast, "
          "2D branch forward + backward")
    print(f"frozen conv/linear tensors: {len(frozen)} ({frozen_mib:.0f} MiB in float32), "
          f"stored in bf16: {cast}")
    for name, row in (("before", before), ("after", after)):
        timing = (f"; step {row['step_s']:.3f} s wall, {row['step_cpu_s']:.3f} s CPU (median of {args.steps})"
                  if row["step_s"] is not None else "")
        print(f"{name:6}: {row['copies']} dtype copies per step, {row['frozen_copies']} of frozen weights "
              f"({row['frozen_copy_mib']:.0f} MiB written){timing}")
    print(f"outputs and gradients bit-identical: {identical}")
    print(f"load average at the end: {' / '.join(f'{x:.1f}' for x in report['load'])}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
