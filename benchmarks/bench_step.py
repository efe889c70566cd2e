"""Model step time: one ``tiny`` training step (forward + losses + backward + AdamW) on CPU.

Target: well under 2 s on the 2-core development machine. The step runs on a synthetic collated
batch (random points voxelised at 2 cm, 320×240 views; tests/model/synthetic_batch.py) with the
mask regularisation active (MaskCLIP included), so it is the most expensive tiny step. The
baseline measured in the same run is the 3D branch alone (UNet + binary head, forward + backward),
so the printout also says what the 2D branch, fusion and losses add.

    .venv/bin/python benchmarks/bench_step.py                      # 2 views x 5000 points, 2 threads
    .venv/bin/python benchmarks/bench_step.py --views 4 --points 20000 --steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.model.synthetic_batch import make_batch  # noqa: E402
from xmask3d.network.losses import compute_losses  # noqa: E402
from xmask3d.network.model import build_model, parameter_groups  # noqa: E402

TARGET_S = 2.0
TEXT_DIM = 384  # MiniLM, the tiny preset's text space


def timed(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--views", type=int, default=2, help="views (samples) per batch")
    parser.add_argument("--points", type=int, default=5000, help="visible points per view")
    parser.add_argument("--classes", type=int, default=15, help="base classes")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_model(args.preset, TEXT_DIM).train()
    cfg = model.cfg.loss
    epoch = cfg.contra_start_epoch  # regularisation (and MaskCLIP) active
    batch = make_batch(views=args.views, points=args.points, num_base=args.classes, text_dim=TEXT_DIM)
    text = torch.nn.functional.normalize(torch.randn(args.classes, TEXT_DIM), dim=-1)
    optimizer = torch.optim.AdamW(parameter_groups(model))
    parts: dict[str, list[float]] = {"forward": [], "losses": [], "backward+step": []}

    def step() -> None:
        t0 = time.perf_counter()
        out = model(batch, text, epoch)
        t1 = time.perf_counter()
        losses = compute_losses(out, batch, cfg, epoch)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        t3 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            parts[key].append(value)

    def step_3d() -> None:
        x = model._inputs(batch)
        three = model.encode_3d(x)
        (three["point_feat"].square().mean() + three["binary_logit"].square().mean()).backward()

    baseline = statistics.median(timed(step_3d, args.steps, args.warmup))
    for values in parts.values():
        values.clear()
    full = timed(step, args.steps, args.warmup)
    median = statistics.median(full)
    n_points = len(batch["uv"])
    n_voxels = len(batch["voxel_coord"])
    print(
        f"preset {args.preset}: {args.views} views, {n_points} points, {n_voxels} voxels, "
        f"{args.classes} base classes, {args.threads} threads, median of {args.steps} steps"
    )
    print(f"load average (1/5/15 min) at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"3D branch fwd+bwd (baseline): {baseline:.3f} s")
    breakdown = ", ".join(f"{k} {statistics.median(v[-args.steps :]):.3f} s" for k, v in parts.items())
    print(f"full training step: {median:.3f} s ({breakdown})")
    print(f"full step / 3D branch: {median / baseline:.2f}x")
    verdict = "OK" if median < TARGET_S else "OVER"
    print(f"full step / {TARGET_S:.0f} s target: {median / TARGET_S:.2f} ({verdict})")


if __name__ == "__main__":
    main()
