"""Model step time and step hygiene: one training step (``xmask3d.engine.step.train_step``: batch to the
device, forward + losses + backward + AdamW) on a synthetic batch.

Timing mode (default) prints the median step time; the baseline in the same run is the 3D branch
alone (UNet + binary head, forward + backward), so the printout also says what the 2D branch,
fusion and losses add. Target on CPU (``tiny``, 2 views x 5000 points): well under 2 s on 2 cores.

``--profile`` runs the same step under ``torch.profiler`` and under a host-sync counter and prints
per-phase times, operator counts (all operators, ``aten::to``, ``aten::_to_copy``) and the host
synchronisations per step by kind and by call site. A host synchronisation is every operation that
makes the host wait for a device value on CUDA: reading a scalar (``.item()``, ``float``/``int``/
``bool`` of a tensor = ``aten::_local_scalar_dense``), ``.tolist()``/``.numpy()``/``.cpu()``, and
operators whose output size depends on the data (``nonzero``, ``unique``, ``masked_select``,
boolean-mask indexing, ``repeat_interleave`` without ``output_size``, ``bincount``). On CPU nothing
actually waits, so the counter is the proxy for the GPU pipeline stalls. Each ``aten::to`` is
also attributed to the operator it runs inside: on CPU an elementwise operator whose inputs differ
in dtype (a float32 tensor and a Python number, wrapped as a float64 or int64 scalar) converts them
first (TensorIterator's input promotion, done for CPU operators only; CUDA kernels convert while
loading), and the multi-tensor fallback of ``torch._foreach_*`` on CPU runs one such operator per
tensor. "Direct" conversions are the ones the code asks for (``.to``, ``.float()``, autocast),
which a GPU step makes too. ``--json PATH`` writes the counts (tests/test_step_counts.py asserts them).

    .venv/bin/python benchmarks/bench_step.py --threads 1                      # 2 views x 5000 points
    .venv/bin/python benchmarks/bench_step.py --threads 1 --profile            # counts and phases
    .venv/bin/python benchmarks/bench_step.py --device cuda --preset paper --batch 16 --points 30000 --amp \
        --unet-bound                                                            # step vs the UNet bound
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
import traceback
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.model.synthetic_batch import make_batch  # noqa: E402
from xmask3d.engine.step import build_optimizer, host_values, train_step  # noqa: E402
from xmask3d.network.config import preset as model_preset  # noqa: E402
from xmask3d.network.config import text_dim  # noqa: E402
from xmask3d.network.losses import compute_losses  # noqa: E402
from xmask3d.network.model import build_model, parameter_groups  # noqa: E402

TARGET_S = 2.0
PHASES = ("step/transfer", "step/forward", "step/losses", "step/backward", "step/optimizer")

# Operators whose CUDA implementation copies a device value to the host before returning.
SYNC_OPS = {
    "aten::_local_scalar_dense": "scalar read (.item/float/int/bool)",
    "aten::nonzero": "nonzero",
    "aten::masked_select": "masked_select",
    "aten::_unique": "unique",
    "aten::_unique2": "unique",
    "aten::unique_dim": "unique",
    "aten::unique_consecutive": "unique",
    "aten::bincount": "bincount",
    "aten::equal": "equal",
}


def _bool_index(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _call_site() -> str:
    """The innermost frame of this repository outside this script (else the innermost frame)."""
    frames = traceback.extract_stack()[:-3]
    for frame in reversed(frames):
        path = Path(frame.filename)
        if ROOT in path.parents and path.name != Path(__file__).name:
            return f"{path.relative_to(ROOT)}:{frame.lineno}"
    for frame in reversed(frames):
        if "torch/utils/_python_dispatch" not in frame.filename:
            return f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """Counts host synchronisations (see the module docstring) by kind and by call site."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: collections.Counter[str] = collections.Counter()
        self.sites: collections.Counter[str] = collections.Counter()
        self._patched: list[tuple[str, Any]] = []

    def _hit(self, kind: str) -> None:
        self.kinds[kind] += 1
        self.sites[f"{kind} @ {_call_site()}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in SYNC_OPS:
            self._hit(SYNC_OPS[name])
        elif name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
            if _bool_index(args[1] if len(args) > 1 else kwargs.get("indices")):
                self._hit("boolean-mask indexing")
        elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None and (
            len(args) < 3 or args[-1] is None
        ):
            self._hit("repeat_interleave without output_size")
        return func(*args, **kwargs)

    def __enter__(self):
        copied: dict[int, weakref.ref] = {}  # host copies already counted, by id

        for method in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, method)

            def wrapper(tensor, *a, _original=original, _method=method, **k):
                ref = copied.get(id(tensor))
                if ref is None or ref() is not tensor:
                    self._hit(f".{_method}()")
                out = _original(tensor, *a, **k)
                if _method == "cpu":
                    copied[id(out)] = weakref.ref(out)
                return out

            self._patched.append((method, original))
            setattr(torch.Tensor, method, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patched:
            setattr(torch.Tensor, method, original)
        self._patched.clear()
        return super().__exit__(*exc)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (a live compile-worker pool is not counted)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, warmup: int, device: torch.device, cpu: list[float] | None = None) -> list[float]:
    """Wall seconds per call after `warmup` calls; the process CPU seconds per call go to `cpu`
    (on a shared machine they do not count the time the process waits for a core)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(time.process_time() - cpu_start)
    return times


def host_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The loader's output: host tensors, pinned when the step copies them to a GPU."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory() for k, v in batch.items()}


def profile_step(step, device: torch.device, steps: int) -> dict[str, Any]:
    """Operator counts and per-phase times (torch.profiler) and host syncs (SyncCounter) per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    ops: collections.Counter[str] = collections.Counter()
    to_by_phase: collections.Counter[str] = collections.Counter()
    to_inside: collections.Counter[str] = collections.Counter()  # the operator an aten::to runs in
    phase_cpu: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    phase_dev: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    for event in prof.events():
        if event.name in phase_cpu:
            phase_cpu[event.name] += event.cpu_time_total / 1e6
            phase_dev[event.name] += getattr(event, "device_time_total", 0.0) / 1e6
        elif event.name.startswith("aten::"):
            ops[event.name] += 1
            if event.name == "aten::to":
                parent = event.cpu_parent
                while parent is not None and parent.name not in phase_cpu:
                    parent = parent.cpu_parent
                to_by_phase[parent.name if parent is not None else "outside"] += 1
                operator = event.cpu_parent
                while operator is not None and not operator.name.startswith("aten::"):
                    operator = operator.cpu_parent
                to_inside[operator.name if operator is not None else "direct"] += 1
    counter = SyncCounter()
    with counter:
        for _ in range(steps):
            step()
        synchronize(device)
    return {
        "steps": steps,
        "aten_ops": sum(ops.values()) / steps,
        "aten_to": ops["aten::to"] / steps,
        "aten_to_by_phase": {k: to_by_phase[k] / steps for k in (*PHASES, "outside")},
        "aten_to_direct": to_inside["direct"] / steps,
        "aten_to_inside_ops": {k: v / steps for k, v in to_inside.most_common() if k != "direct"},
        "aten_to_copy": ops["aten::_to_copy"] / steps,
        "aten_copy_": ops["aten::copy_"] / steps,
        "syncs": sum(counter.kinds.values()) / steps,
        "sync_kinds": {k: v / steps for k, v in counter.kinds.most_common()},
        "sync_sites": {k: v / steps for k, v in counter.sites.most_common(25)},
        "phase_cpu_s": {k: v / steps for k, v in phase_cpu.items()},
        "phase_device_s": {k: v / steps for k, v in phase_dev.items()} if device.type == "cuda" else None,
        "top_ops": {k: v / steps for k, v in ops.most_common(12)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", "--views", dest="views", type=int, default=2, help="views per batch")
    parser.add_argument("--points", type=int, default=5000, help="visible points per view")
    parser.add_argument("--classes", type=int, default=15, help="base classes")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only, as TrainConfig.amp)")
    parser.add_argument("--compile", action="store_true", help="TrainConfig.compile")
    parser.add_argument("--conv0-large-kernel-fast", action="store_true",
                        help="Backbone3DConfig.conv0_large_kernel_fast (implicit GEMM for the 5^3 conv0)")
    parser.add_argument("--grad-clip", type=float, default=5.0, help="as the tiny recipe; 0 = off")
    parser.add_argument("--log-every", type=int, default=1, help="steps between loss transfers to the host")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="operator, aten::to and host-sync counts")
    parser.add_argument("--no-baseline", action="store_true", help="skip the 3D-branch-alone timing")
    parser.add_argument("--unet-bound", action="store_true",
                        help="also time the frozen SD UNet alone, fwd + bwd to its conditioning (the bound)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model_cfg = model_preset(args.preset)
    if args.conv0_large_kernel_fast:
        model_cfg = dataclasses.replace(
            model_cfg, backbone=dataclasses.replace(model_cfg.backbone, conv0_large_kernel_fast=True))
    dim = text_dim(model_cfg.text_encoder)
    model = build_model(model_cfg, dim).to(device).train()
    cfg = model.cfg.loss
    epoch = cfg.contra_start_epoch  # regularisation (and MaskCLIP) active
    image_size = (240, 320)
    batch = host_batch(make_batch(views=args.views, points=args.points, num_base=args.classes, text_dim=dim,
                                  image_size=image_size), device)
    text = torch.nn.functional.normalize(torch.randn(args.classes, dim), dim=-1).to(device)
    optimizer = build_optimizer(parameter_groups(model))
    result_params = sum(len(g["params"]) for g in optimizer.param_groups)
    amp = args.amp and device.type == "cuda"
    if args.compile:
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        model.compile_heads()

    def loss_fn(m, b, ep):
        with torch.profiler.record_function("step/forward"):
            out = m(b, text, ep)
        with torch.profiler.record_function("step/losses"):
            terms = compute_losses(out, b, cfg, ep)
        return {"loss": terms["total"], **{k: v for k, v in terms.items() if k != "total"}}

    counter = {"step": 0}

    def step() -> None:
        counter["step"] += 1
        values = train_step(model, batch, epoch, loss_fn, optimizer, device=device, grad_clip=args.grad_clip,
                            amp=amp)
        if counter["step"] % args.log_every == 0:  # what fit() does: one transfer every log_every steps
            host_values({**values, "nonfinite": (~torch.isfinite(values["loss/loss"])).long()})

    gen = model.mask_generator
    views = args.views
    latent_shape = (views, gen.vae.config.latent_channels, *gen.noise.shape[-2:])

    def step_unet() -> None:
        """The bound: the frozen SD UNet alone, forward + backward to its conditioning inputs (the
        context and the time-embedding offset), at the step's batch and precision."""
        with torch.no_grad():
            ctx, temb = gen.condition(torch.randn(views, dim, device=device))
        ctx = ctx.detach().requires_grad_()
        temb = temb.detach().requires_grad_() if temb is not None else None
        latent = torch.randn(latent_shape, device=device)
        t = torch.zeros(views, dtype=torch.long, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            out = gen.unet(latent, t, encoder_hidden_states=ctx, class_labels=temb).sample
        out.float().square().mean().backward()

    def step_3d() -> None:
        x = model._inputs({k: v.to(device, non_blocking=True) for k, v in batch.items()})
        three = model.encode_3d(x)
        (three["point_feat"].square().mean() + three["binary_logit"].square().mean()).backward()

    result: dict[str, Any] = {"preset": args.preset, "device": str(device), "views": args.views,
                              "points": args.points, "threads": args.threads, "amp": amp,
                              "compile": args.compile, "parameter_tensors": result_params,
                              "conv0_large_kernel_fast": args.conv0_large_kernel_fast,
                              "conv0_algo": str(model.backbone3d.unet.conv0.algo)}
    if args.compile:
        step()  # the first call compiles (forward and backward graphs)
        synchronize(device)
        result["compile_warmup_s"] = time.perf_counter() - start
        result["compile_warmup_cpu_s"] = _cpu_seconds() - cpu_start
    baseline = unet_bound = None
    if not args.no_baseline and not args.profile:
        baseline = statistics.median(timed(step_3d, args.steps, args.warmup, device))
    if args.unet_bound:
        unet_bound = statistics.median(timed(step_unet, args.steps, args.warmup, device))
    cpu_times: list[float] = []
    full = timed(step, args.steps, args.warmup, device, cpu_times)
    median = statistics.median(full)
    n_points = len(batch["uv"])
    n_voxels = len(batch["voxel_coord"])
    load = os.getloadavg()
    result |= {"step_s": median, "step_times_s": full, "step_cpu_s": statistics.median(cpu_times),
               "baseline_3d_s": baseline, "unet_bound_s": unet_bound, "load": load}
    print(
        f"preset {args.preset} on {device}{' (bf16 autocast)' if amp else ''}: {args.views} views, "
        f"{n_points} points, {n_voxels} voxels, {args.classes} base classes, {args.threads} threads, "
        f"median of {args.steps} steps; conv0 {result['conv0_algo']}"
    )
    if args.compile:
        print(f"torch.compile warm-up (first step incl. compilation): {result['compile_warmup_s']:.1f} s "
              f"wall, {result['compile_warmup_cpu_s']:.1f} s CPU (with TORCHINDUCTOR_COMPILE_THREADS=1 "
              "the compilation runs in this process)")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_memory_gib"] = peak
        print(f"peak GPU memory: {peak:.2f} GiB ({torch.cuda.get_device_name(device)})")
    print(f"full training step: {median:.3f} s (min {min(full):.3f}, max {max(full):.3f}); "
          f"process CPU time {result['step_cpu_s']:.3f} s")
    if baseline is not None:
        print(f"3D branch fwd+bwd (baseline): {baseline:.3f} s; "
              f"full step / 3D branch: {median / baseline:.2f}x")
        verdict = "OK" if median < TARGET_S else "OVER"
        print(f"full step / {TARGET_S:.0f} s target: {median / TARGET_S:.2f} ({verdict})")
    if unet_bound is not None:
        print(f"frozen SD UNet alone, fwd + bwd to its conditioning (bound): {unet_bound:.3f} s; "
              f"full step / UNet: {median / unet_bound:.2f}x (target <= 2.5x on the GPU)")
    if args.profile:
        prof = profile_step(step, device, max(1, min(args.steps, 3)))
        result["profile"] = prof
        phases = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in prof["phase_cpu_s"].items())
        print(f"per-phase CPU time (s, profiled): {phases}")
        if prof["phase_device_s"] is not None:
            phases = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in prof["phase_device_s"].items())
            print(f"per-phase device time (s, profiled): {phases}")
        print(f"operators per step: {prof['aten_ops']:.0f}; aten::to {prof['aten_to']:.0f}, "
              f"aten::_to_copy {prof['aten_to_copy']:.0f}, aten::copy_ {prof['aten_copy_']:.0f}")
        print("aten::to per phase: " + ", ".join(
            f"{k.split('/')[-1]} {v:.0f}" for k, v in prof["aten_to_by_phase"].items()))
        inside = prof["aten_to_inside_ops"]
        print(f"aten::to called directly (Python code, autocast, the loader's transfer): "
              f"{prof['aten_to_direct']:.0f}; inside another operator: {sum(inside.values()):.0f} ("
              + ", ".join(f"{k} {v:.0f}" for k, v in list(inside.items())[:6]) + ")")
        print(f"host synchronisations per step: {prof['syncs']:.0f}")
        for kind, count in prof["sync_kinds"].items():
            print(f"  {count:7.1f}  {kind}")
        print("  by call site:")
        for site, count in prof["sync_sites"].items():
            print(f"  {count:7.1f}  {site}")
        print("  most frequent operators: " + ", ".join(f"{k} {v:.0f}" for k, v in prof["top_ops"].items()))
    print(f"load average (1/5/15 min) at the end: {' / '.join(f'{x:.1f}' for x in load)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
