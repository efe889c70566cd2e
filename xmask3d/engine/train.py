"""Training: AdamW (two lr groups), cosine-per-iteration schedule with warm-up, checkpoints, DDP.

`train()` is what `xmask3d train`, the `train/<benchmark>` flow and the demo call: it checks the
inputs (benchmark, store labels, text encoder, MLflow backend, resume checkpoint) *before* any
training, trains with :func:`fit`, evaluates on the validation scenes, logs everything to MLflow
and registers the model. :func:`fit` is the loop itself and knows nothing about XMask3D: it takes
a model, a dataset and a loss function, so its mechanics (bit-for-bit resume, DDP sync) are
tested on any module.

One sample = one scene with one random view (``SceneViewDataset`` in train mode); an epoch sees
every training scene ``loop`` times. The official recipe (XMASK3D_SPEC.md §6) is the ``paper``
preset; ``tiny`` trains in minutes on a CPU.

DDP: launched by ``torchrun`` (WORLD_SIZE > 1), NCCL on CUDA and gloo on CPU, a
``DistributedSampler`` per rank; only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from preprocessing.text import build_text_encoder
from storage.benchmarks import get_benchmark
from storage.dataset import SceneViewDataset, collate_scenes
from storage.errors import InputError
from storage.objects import as_path
from storage.store import open_store
from xmask3d.engine import tracking
from xmask3d.engine.checkpoint import (
    LAST_NAME,
    capture_rng_state,
    check_compatible,
    load_checkpoint,
    load_model_state,
    model_state,
    pretrained_prefixes,
    restore_rng_state,
    save_checkpoint,
)
from xmask3d.engine.evaluate import (
    as_percent,
    evaluate_loaded,
    evaluation_protocol,
    log_evaluation,
    validate,
    validation_set,
)
from xmask3d.engine.predict import LoadedModel
from xmask3d.engine.progress import TrainProgress
from xmask3d.engine.run_lease import end_abandoned_runs, hold_run
from xmask3d.engine.step import LossFn, build_optimizer, host_values, train_step
from xmask3d.network.config import SWITCHES, check_switches, missing_pretrained, with_switches
from xmask3d.network.config import preset as model_preset
from xmask3d.network.losses import compute_losses
from xmask3d.network.model import build_model
from xmask3d.network.precision import FrozenWeights

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every training hyperparameter; logged to MLflow as ``train.*`` params."""

    preset: str = "tiny"  # model preset (xmask3d.network.config.preset) this recipe trains
    epochs: int = 150
    loop: int = 16  # each epoch sees every training scene `loop` times (random view each time)
    batch_size: int = 16  # scenes per process and step
    lr_3d: float = 1e-3  # 3D branch + binary head
    lr_other: float = 1e-4  # everything else that is trainable (frozen weights excluded)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iters: int = 0  # linear warm-up from warmup_factor·lr, then cosine to 0
    warmup_factor: float = 0.01
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    amp: bool = False  # bf16 autocast; CUDA only (ignored on CPU)
    checkpoint_every: int = 0  # steps; 0 = only at epoch ends and at the end
    seed: int = 5557
    num_workers: int = 4
    log_every: int = 1  # steps between MLflow metric logs
    max_steps: int = 0  # > 0: stop after this many steps (smoke runs, tests)
    checkpoint_dir: str = "checkpoints"
    voxel_size: float = 0.02
    image_size: tuple[int, int] = (320, 240)
    evaluate: bool = True  # evaluate on the val scenes after training and register the model
    eval_max_views: int = 0  # 0 = every view of every val scene (the official protocol)
    ply_scenes: int = 3  # scenes exported as coloured PLY (prediction vs ground truth)
    contra_start_epoch: int | None = None  # None = the benchmark's (50 / 75 epochs)
    torch_threads: int = 0  # > 0: torch.set_num_threads (intra-op threads); 0 = torch's default
    # training augmentation of the 3D input, the official recipe (storage.dataset): voxeliser rotation
    # (z ~ U(±pi), x/y ~ U(±pi/64)) and scale U(0.9, 1.1), then a random integer voxel shift U{0..99}
    augment: bool = False
    val_every: int = 0  # epochs between validations on `val_views` fixed views (0 = none); also at the end
    val_views: int = 64  # size of the fixed validation subset (round-robin over the val scenes)
    progress_every_s: float = 60.0  # seconds between plain progress lines when stderr is not a terminal
    # torch.compile the 2D heads (pixel decoder, transformer decoder, feature projections); the
    # first steps pay the compilation (docs/benchmarks.md, training step)
    compile: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRAIN_PRESETS: dict[str, TrainConfig] = {
    # The official recipe: 150 epochs, loop 16, 16 scenes per GPU (x4 GPUs = 64), no warm-up,
    # no clipping, no AMP, cosine per iteration, seed 5557.
    # Voxeliser augmentation and voxel shift on (official). Validation every 5 epochs on 312 views
    # (one per ScanNet val scene; the official code validates one view per scene every epoch).
    "paper": TrainConfig(preset="paper", epochs=150, loop=16, batch_size=16, warmup_iters=0,
                         grad_clip=0.0, amp=False, checkpoint_every=2000, num_workers=4, log_every=20,
                         augment=True, val_every=5, val_views=312),
    # One GPU with a reduced model: bf16, short warm-up and clipping for stability.
    "small": TrainConfig(preset="small", epochs=50, loop=8, batch_size=8, warmup_iters=200,
                         grad_clip=1.0, amp=True, checkpoint_every=1000, num_workers=4, log_every=10,
                         augment=True, val_every=5, val_views=128),
    # CPU tests and the demo: minutes on 2 cores. The random-init model learns faster with a
    # larger lr on the non-3D parts than the pretrained-weights recipe.
    # 6 epochs x loop 16 over the demo's 3 training scenes = 144 steps; the mask regularisation
    # starts at epoch 2 (a third of training, as 50 of 150 in the paper). One intra-op thread: the
    # tiny model's ops are too small for threading to pay (measured on 2 cores: 0.55 CPU-s per
    # step with 1 thread, 4-6 CPU-s with 2), see docs/benchmarks.md.
    "tiny": TrainConfig(preset="tiny", epochs=6, loop=16, batch_size=2, lr_3d=3e-3, lr_other=1e-3,
                        warmup_iters=10, grad_clip=5.0, amp=False, checkpoint_every=24, num_workers=0,
                        log_every=1, eval_max_views=0, ply_scenes=2, contra_start_epoch=2, torch_threads=1,
                        val_every=2, val_views=8),
}


def train_preset(name: str, **overrides: Any) -> TrainConfig:
    """A named training recipe, with fields overridden by keyword."""
    if name not in TRAIN_PRESETS:
        raise InputError(f"unknown training preset {name!r} (choose from {', '.join(TRAIN_PRESETS)})")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise InputError(f"unknown TrainConfig field(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(TRAIN_PRESETS[name], **overrides)


# --------------------------------------------------------------------------------------------
# Optimiser and schedule


def param_groups(model: nn.Module, lr_3d: float, lr_other: float, is_3d: Callable[[str], bool],
                 weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups, frozen parameters (requires_grad False) left out."""
    fast, slow = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (fast if is_3d(name) else slow).append(param)
    groups = [{"name": "3d", "params": fast, "lr": lr_3d, "weight_decay": weight_decay},
              {"name": "other", "params": slow, "lr": lr_other, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


class WarmupCosine:
    """lr = base·f(step): linear warm-up from `warmup_factor`, then ½(1+cos(π·t)) to 0.

    With no warm-up this is the official schedule (lr set after each step from the iteration
    count, max_it = epochs·iterations per epoch). State = the step count.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_iters: int = 0,
                 warmup_factor: float = 0.01) -> None:
        self.optimizer = optimizer
        self.total_steps = max(1, total_steps)
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, self.base_lrs, strict=True):
            group["initial_lr"] = base
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        if step < self.warmup_iters:
            alpha = step / self.warmup_iters
            return self.warmup_factor + (1 - self.warmup_factor) * alpha
        span = max(1, self.total_steps - self.warmup_iters)
        t = min(1.0, (step - self.warmup_iters) / span)
        return 0.5 * (1 + math.cos(math.pi * t))

    def _apply(self) -> None:
        f = self.factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "total_steps": self.total_steps,
                "warmup_iters": self.warmup_iters, "warmup_factor": self.warmup_factor,
                "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.total_steps = int(state["total_steps"])
        self.warmup_iters = int(state["warmup_iters"])
        self.warmup_factor = float(state["warmup_factor"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()


# --------------------------------------------------------------------------------------------
# Distributed helpers


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return DistInfo(device=torch.device("cuda") if cuda else torch.device("cpu"))

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(rank, world, local, torch.device("cuda", local) if cuda else torch.device("cpu"))


def _barrier(info: DistInfo) -> None:
    if info.world_size > 1:

        dist.barrier()


def _gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    state = capture_rng_state()
    if info.world_size == 1:
        return [state]

    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def _broadcast(value: Any, info: DistInfo) -> Any:
    if info.world_size == 1:
        return value

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class FitResult:
    step: int
    checkpoint_path: Path | None
    last_losses: dict[str, float]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fit(model: nn.Module, dataset: Dataset, collate_fn: Callable[[list], Any] | None, loss_fn: LossFn,
        cfg: TrainConfig, *, is_3d: Callable[[str], bool], checkpoint_dir: Path,
        meta: Mapping[str, Any] | None = None, resume: Mapping[str, Any] | None = None,
        on_log: Callable[[dict[str, float], int], None] | None = None,
        info: DistInfo | None = None, skip_prefixes: tuple[str, ...] = (),
        on_epoch_end: Callable[[int, int, bool], None] | None = None,
        logger: logging.Logger | logging.LoggerAdapter | None = None) -> FitResult:
    """Train `model` on `dataset` with `loss_fn(model, batch, epoch) -> {"loss": total, term: value}`.

    `model` must already be seeded/initialised identically on every rank; `resume` is a
    checkpoint payload (model, optimizer, scheduler, rng, step) to continue from. Checkpoints
    (`<checkpoint_dir>/last.pt`) are written every `cfg.checkpoint_every` steps, at each epoch end
    and at the end, by rank 0, with `meta` (preset, benchmark, text encoder, ...) included.
    State-dict keys starting with `skip_prefixes` (frozen weights loaded from pretrained files)
    are left out of checkpoints. ``on_epoch_end(epoch, step, final)`` runs on every rank after an
    epoch's checkpoint and after the last step (``final``), e.g. validation. Progress
    (``xmask3d.engine.progress``): a bar on a terminal, else plain lines through ``logger`` every
    ``cfg.progress_every_s`` seconds and per epoch (default logger: this module's).
    """
    info = info or DistInfo()
    device = info.device
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    model.to(device)
    if resume is not None:
        load_model_state(model, resume["model"], skip_prefixes)
    groups = param_groups(model, cfg.lr_3d, cfg.lr_other, is_3d, cfg.weight_decay)
    optimizer = build_optimizer(groups, cfg.betas, cfg.weight_decay)
    train_model: nn.Module = model
    if info.world_size > 1:

        train_model = DistributedDataParallel(
            model, device_ids=[info.local_rank] if device.type == "cuda" else None,
            find_unused_parameters=True)
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    iters_per_epoch = len(sampler) // cfg.batch_size
    if iters_per_epoch == 0:
        raise InputError(f"{len(sampler)} training samples per process are fewer than batch_size "
                         f"{cfg.batch_size}: lower batch_size or raise loop")
    total_steps = cfg.epochs * iters_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = WarmupCosine(optimizer, cfg.epochs * iters_per_epoch, cfg.warmup_iters, cfg.warmup_factor)
    step = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        step = int(resume["step"])
        rng = resume.get("rng") or []
        if len(rng) == info.world_size:
            restore_rng_state(rng[info.rank])
        else:
            log.warning("checkpoint has RNG states of %d processes, running %d: reseeding", len(rng),
                        info.world_size)
            seed_everything(cfg.seed + 1000 * info.rank + step)
    checkpoint_dir = Path(checkpoint_dir)
    ckpt_path = checkpoint_dir / LAST_NAME
    group_names = [g["name"] for g in groups]
    use_amp = cfg.amp and device.type == "cuda"
    if cfg.amp and not use_amp:
        (logger or log).warning("amp: bf16 autocast runs on CUDA only; training in float32 on %s", device)
    frozen = FrozenWeights(model, torch.bfloat16) if use_amp else None
    last: dict[str, float] = {}
    written: Path | None = None

    nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # steps with a non-finite loss
    checked = step  # the last step whose losses were read on the host

    def transfer(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The step's values on the host, with every step since the last transfer checked finite."""
        nonlocal checked
        host = host_values({**values, "nonfinite": nonfinite})
        if host.pop("nonfinite"):
            raise FloatingPointError(f"non-finite loss in steps {checked + 1}-{step}; at step {step}: "
                                     + ", ".join(f"{k}={v:.4g}" for k, v in host.items()))
        checked = step
        return host

    def save() -> None:
        nonlocal written
        if checked != step:
            transfer({})  # no checkpoint of weights updated with a non-finite loss
        rng = _gather_rng(info)
        if info.is_main:
            state = model_state(model, skip_prefixes)
            if frozen is not None:  # the original frozen weights, also while the steps hold bf16 ones
                state |= {k: v for k, v in frozen.original_state().items() if k in state}
            written = save_checkpoint(ckpt_path, {
                "model": state, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng, "step": step,
                "epoch": step // iters_per_epoch, "train_config": cfg.to_dict(), **(meta or {}),
            })
        _barrier(info)

    progress = TrainProgress(total_steps, step, iters_per_epoch, cfg.epochs, logger=logger or log,
                             enabled=info.is_main, interval_s=cfg.progress_every_s)
    model.train()
    while step < total_steps:
        epoch = step // iters_per_epoch
        offset = step - epoch * iters_per_epoch
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        batches = [indices[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(iters_per_epoch)]
        batches = batches[offset:offset + (total_steps - step)]
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn,
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        sums: dict[str, float] = {}
        progress.start_epoch(epoch, offset)
        # under bf16 autocast the frozen conv/linear weights are stored in bf16 for the epoch's
        # steps (bit-identical, no per-step copies; network/precision.py), the float32 originals
        # again before validation, which runs without autocast
        with frozen.lowered() if frozen is not None else nullcontext():
            for batch in loader:
                values = train_step(train_model, batch, epoch, loss_fn, optimizer, device=device,
                                    grad_clip=cfg.grad_clip, amp=use_amp)
                nonfinite.add_(~torch.isfinite(values["loss/loss"]))  # read at the next transfer
                lrs = {f"lr/{n}": g["lr"] for n, g in zip(group_names, optimizer.param_groups, strict=True)}
                scheduler.step()
                step += 1
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + value
                if step % cfg.log_every == 0 or step == total_steps:  # the one transfer to the host
                    last = {**transfer(values), **lrs, "epoch": step / iters_per_epoch}
                    if on_log is not None and info.is_main:
                        on_log(last, step)
                progress.update(step, last)  # the values of the last transfer
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save()
        count = max(1, len(batches))
        progress.end_epoch(epoch, step, float(sums.get("loss/loss", float("nan"))) / count, last)
        if step % iters_per_epoch == 0 or step == total_steps:
            if not (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                save()
            if on_epoch_end is not None:
                on_epoch_end(epoch, step, step == total_steps)
    progress.close()
    if written is None and info.is_main and ckpt_path.is_file():
        written = ckpt_path
    return FitResult(step=step, checkpoint_path=written, last_losses=last)


# --------------------------------------------------------------------------------------------
# XMask3D training entry point


@dataclass
class TrainResult:
    """What a training run produced: MLflow references and the evaluation metrics."""

    run_id: str
    checkpoint_path: Path
    model_uri: str | None  # models:/xmask3d-<benchmark>/<version>, None without evaluation
    metrics: dict[str, float]  # "<head>/<metric>", e.g. "fused/hiou"
    model_version: str | None = None
    experiment_id: str | None = None
    steps: int = 0
    evaluation: Any = None  # xmask3d.engine.evaluate.Evaluation (table(), per-class IoU) when evaluated

    @property
    def checkpoint(self) -> Path:
        return self.checkpoint_path


def resolve_resume(resume: str | Path, tracking_uri: str | None, checkpoint_root: Path,
                   download_dir: Path) -> tuple[Path, str | None]:
    """`resume` is a checkpoint file/dir or an MLflow run id -> (checkpoint file, run id or None)."""

    path = Path(resume)
    if path.exists():
        return (path / LAST_NAME if path.is_dir() else path), None
    run_id = str(resume)
    local = checkpoint_root / run_id / LAST_NAME
    if local.is_file():
        return local, run_id
    if "/" in run_id or "." in run_id:
        raise InputError(f"{resume}: checkpoint not found")
    return tracking.download_run_checkpoint(tracking_uri, run_id, download_dir), run_id


@dataclass(frozen=True)
class StoreInfo:
    dataset: str
    text_encoder: str
    text_dim: int
    train_scenes: list[str]
    val_scenes: list[str]


def check_store(store_path: Path, bench: Any, need_val: bool, need_regions: bool = False) -> StoreInfo:
    """The store fits the benchmark: same dataset, the label field in every scene, train scenes,
    and region captions in every training scene when the region-caption losses are on."""

    store = open_store(store_path)
    attrs = store.attrs
    if attrs.get("dataset") != bench.dataset:
        raise InputError(f"{store_path}: store holds dataset {attrs.get('dataset')!r}, benchmark "
                         f"{bench.name} needs {bench.dataset!r}")
    train_ids, val_ids = store.scene_ids("train"), store.scene_ids("val")
    if not train_ids:
        raise InputError(f"{store_path}: no training scenes")
    if need_val and not val_ids:
        raise InputError(f"{store_path}: no validation scenes to evaluate on")
    for scene_id in train_ids + val_ids:
        if bench.store_field not in store.scene(scene_id):
            raise InputError(f"{store_path}: scene {scene_id} has no {bench.store_field} labels, which "
                             f"benchmark {bench.name} needs")
    if need_regions:
        without = [s for s in train_ids if not store.scene(s).has_region_captions]
        if without:
            raise InputError(f"{store_path}: caption_supervision needs region captions, training scene(s) "
                             f"{', '.join(without[:5])} have none (preprocess with --region-captions or "
                             "run xmask3d import-captions)")
    if not attrs.get("text_encoder") or not attrs.get("text_dim"):
        raise InputError(f"{store_path}: store records no text encoder (text_encoder/text_dim attrs)")
    return StoreInfo(bench.dataset, str(attrs["text_encoder"]), int(attrs["text_dim"]), train_ids, val_ids)


def check_text_encoder(store_path: Path, store: StoreInfo, encoder: Any) -> None:
    if store.text_encoder != encoder.name or store.text_dim != encoder.dim:
        raise InputError(f"{store_path}: captions were embedded with {store.text_encoder} "
                         f"({store.text_dim}-d) but the preset uses {encoder.name} ({encoder.dim}-d); "
                         f"re-run preprocessing with that text encoder")


def train(store_path: Path, benchmark: str, preset: str = "tiny", cfg: TrainConfig | None = None,
          tracking_uri: str | None = None, resume: str | Path | None = None, sd_dir: str | Path | None = None,
          clip_checkpoint: str | Path | None = None, switches: Mapping[str, bool] | None = None,
          caption_supervision: str | None = None, loss_overrides: Mapping[str, Any] | None = None,
          random_init: bool = False, logger: logging.Logger | logging.LoggerAdapter | None = None
          ) -> TrainResult:
    """Train XMask3D on `benchmark` from the store, evaluate, log to MLflow, register the model.

    Every input is checked before training starts (InputError): benchmark name, store dataset
    and labels, text encoder of the store vs the preset, MLflow backend reachable, and a resumed
    checkpoint's preset/benchmark. `resume` is a checkpoint file/dir or an MLflow run id (its
    local `checkpoints/<run_id>/last.pt`, else the run's checkpoint artifact). `sd_dir` and
    `clip_checkpoint` are the local pretrained weights of the `paper` preset. `switches` turns model
    components off (``xmask3d.network.config.SWITCHES``, e.g. ``{"fusion": False}``; the ablation study); a
    resumed checkpoint must have the same switches. ``caption_supervision`` ("official", "region",
    "official+region"; None = the preset's) selects the caption losses (docs/openvocab.md);
    ``loss_overrides`` sets other ``LossConfig`` fields (e.g. ``{"region_pooling": "mean"}``).
    The ``paper`` preset refuses to train with random Stable Diffusion / CLIP weights (a missing
    folder or file is an InputError naming it) unless ``random_init`` is set; the run is then
    tagged ``random_init=true``, and without the CLIP file the text space is the store's encoder.
    Progress lines go to ``logger`` (the flows pass Prefect's run logger), else the module's.
    """

    store_path = as_path(store_path)
    bench = get_benchmark(benchmark)
    cfg = cfg or train_preset(preset)
    if cfg.preset != preset:
        raise InputError(f"training config is for preset {cfg.preset!r}, not {preset!r}")
    if cfg.torch_threads > 0:  # before anything computes (text embeddings, model init), so that a
        torch.set_num_threads(cfg.torch_threads)  # run's numbers do not depend on what ran before it
    model_cfg = with_switches(model_preset(preset, sd_dir=sd_dir, clip_checkpoint=clip_checkpoint),
                              **(switches or {}))
    random_parts = missing_pretrained(model_cfg)
    if random_parts and not random_init:
        raise InputError(f"preset {preset!r} would train with random weights: {'; '.join(random_parts)} "
                         "(pass --random-init to train so anyway)")
    if caption_supervision is not None:
        model_cfg = dataclasses.replace(model_cfg, caption_supervision=caption_supervision)
    weights = {"sd_dir": str(sd_dir) if sd_dir else None,
               "clip_checkpoint": str(clip_checkpoint) if clip_checkpoint else None,
               "random": random_parts}  # paper parts with random weights (--random-init)
    loss_cfg = model_cfg.loss.with_benchmark(bench)
    if cfg.contra_start_epoch is not None:
        loss_cfg = dataclasses.replace(loss_cfg, contra_start_epoch=cfg.contra_start_epoch)
    if loss_overrides:
        known = {f.name for f in dataclasses.fields(loss_cfg)} - set(SWITCHES) - {"caption_supervision"}
        unknown = set(loss_overrides) - known
        if unknown:
            raise InputError(f"unknown loss setting(s) {sorted(unknown)}")
        try:
            loss_cfg = dataclasses.replace(loss_cfg, **loss_overrides)
        except ValueError as error:
            raise InputError(str(error)) from error
    model_cfg = dataclasses.replace(model_cfg, loss=loss_cfg)  # forward and losses agree on the recipe
    store = check_store(store_path, bench, need_val=cfg.evaluate or cfg.val_every > 0,
                        need_regions=loss_cfg.region_captions)
    if random_init and model_cfg.clip.checkpoint is None and model_cfg.text_encoder.startswith("openclip:"):
        model_cfg = dataclasses.replace(model_cfg, text_encoder=random_init_text_encoder(store_path, store))
    info = init_distributed()
    uri = tracking.resolve_tracking_uri(tracking_uri)
    if info.is_main:
        tracking.check_tracking_available(uri)
    checkpoint_root = Path(cfg.checkpoint_dir)
    payload, run_id = None, None
    if resume is not None:
        ckpt, run_id = resolve_resume(resume, uri, checkpoint_root, checkpoint_root / ".downloads")
        payload = load_checkpoint(ckpt)
        check_compatible(payload, ckpt, preset=preset, benchmark=benchmark)
        check_switches(payload.get("model_config"), model_cfg, str(ckpt))
        run_id = run_id or payload.get("run_id")
    encoder = build_text_encoder(model_cfg.text_encoder)
    check_text_encoder(store_path, store, encoder)
    if payload is not None and payload.get("text_encoder", {}).get("name") != encoder.name:
        raise InputError(f"{resume}: checkpoint was trained with text encoder "
                         f"{payload.get('text_encoder')}, the preset uses {encoder.name}")

    run, lease = None, None
    try:
        if info.is_main:
            if run_id is not None:  # before the resumed run's record changes
                lease = hold_run(checkpoint_root, run_id)
            tags = {"preset": preset, "store": str(store_path.resolve())}
            if random_init:
                tags["random_init"] = "true"
                tags["random_init.parts"] = ("; ".join(random_parts)
                                             or "none (every pretrained weight present)")
            run = tracking.RunTracker(uri, benchmark, run_id=run_id, run_name=f"{benchmark}-{preset}",
                                      tags=tags)
            lease = lease or hold_run(checkpoint_root, run.run_id)
            for gone in end_abandoned_runs(run.client, run.experiment_id, checkpoint_root, run.run_id):
                (logger or log).warning("MLflow run %s was RUNNING but its training process is gone "
                                        "(killed): marked KILLED; --resume %s continues it", gone, gone)
            run.log_params({"train": cfg.to_dict(), "model": dataclasses.asdict(model_cfg),
                            "protocol": evaluation_protocol(bench, cfg.eval_max_views, encoder.name),
                            "data": {"store": str(store_path.resolve()), "benchmark": benchmark,
                                     "train_scenes": len(store.train_scenes),
                                     "val_scenes": len(store.val_scenes),
                                     "text_encoder": encoder.name, "text_dim": encoder.dim},
                            "world_size": info.world_size})
        run_id = _broadcast(run.run_id if run else None, info)
        try:
            with _terminate_raises():
                result = _train_model(store_path, bench, preset, cfg, model_cfg, encoder, info, run, run_id,
                                      checkpoint_root / run_id, payload, weights, logger or log)
        except BaseException as error:  # the run must not stay RUNNING; only SIGKILL leaves it so
            if run is not None:
                run.end("KILLED" if isinstance(error, KeyboardInterrupt | SystemExit) else "FAILED")
            raise
    finally:
        if lease is not None:
            lease.release()
    return result


def random_init_text_encoder(store_path: Path, store: StoreInfo) -> str:
    """``paper`` with ``--random-init`` and no CLIP file: the text space is the store's encoder,
    which must be one that needs no weights file (the store's captions were embedded with it)."""
    if store.text_encoder in ("minilm", "openclip-tiny"):
        log.warning("random-init paper model without a CLIP checkpoint: class names and captions use the "
                    "store's text encoder %s", store.text_encoder)
        return store.text_encoder
    raise InputError(f"{store_path}: captions were embedded with {store.text_encoder}, whose weights file "
                     "the paper text encoder needs even with --random-init (give --clip-checkpoint)")


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """SIGTERM (a worker or torchrun stopping us) raises SystemExit(143), so cleanup runs.

    Only in the main thread and only where SIGTERM still has its default action.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def is_3d_parameter(name: str) -> bool:
    """The lr_3d group: the 3D branch and the binary head (official `pc_decoder`, `pc_binary_head`)."""
    name = name.removeprefix("module.")
    return name.startswith(("backbone3d.", "binary_head."))


BEST_NAME = "best.pt"  # the checkpoint with the best validation score, beside last.pt
BEST_RECORD = "best.json"  # {"step", "metric", "value"} of best.pt (read back on resume)


def _read_best(checkpoint_dir: Path) -> dict[str, Any] | None:
    path = checkpoint_dir / BEST_RECORD
    if not (path.is_file() and (checkpoint_dir / BEST_NAME).is_file()):
        return None
    try:
        record = json.loads(path.read_text())
        return {"step": int(record["step"]), "metric": str(record["metric"]), "value": float(record["value"])}
    except (ValueError, KeyError, TypeError):
        log.warning("%s: unreadable, the best checkpoint is chosen anew", path)
        return None


def _keep_best(checkpoint_dir: Path, record: dict[str, Any]) -> None:
    """Copy last.pt to best.pt and write its record, each atomically (temp file + rename)."""
    tmp = checkpoint_dir / (BEST_NAME + ".tmp")
    shutil.copyfile(checkpoint_dir / LAST_NAME, tmp)
    os.replace(tmp, checkpoint_dir / BEST_NAME)
    tmp_record = checkpoint_dir / (BEST_RECORD + ".tmp")
    tmp_record.write_text(json.dumps(record))
    os.replace(tmp_record, checkpoint_dir / BEST_RECORD)


class Validator:
    """Validation every ``cfg.val_every`` epochs (and after the last step) on a fixed subset of
    validation views; logs ``val/<head>/<metric>`` (%) at the training step and keeps ``best.pt``.

    The best model is the one with the highest primary score (``ValidationSet.primary``: fused hIoU
    when the subset shows novel classes, else fused mIoU over all classes); NaN never wins.
    Runs on rank 0 (the others wait at a barrier); the RNG states are restored afterwards so
    validation changes nothing in the training that follows.
    """

    def __init__(self, cfg: TrainConfig, store_path: Path, bench: Any, loaded: Any, checkpoint_dir: Path,
                 run: Any, info: DistInfo, logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.cfg, self.store_path, self.bench, self.loaded = cfg, store_path, bench, loaded
        self.checkpoint_dir, self.run, self.info, self.logger = checkpoint_dir, run, info, logger
        self.views = validation_set(store_path, bench.name, cfg.val_views, seed=cfg.seed) \
            if info.is_main else None
        self.best = _read_best(checkpoint_dir) if info.is_main else None
        if self.best is not None and self.views is not None and self.best["metric"] != self.views.primary:
            self.best = None
        self.history: list[tuple[int, dict[str, float]]] = []

    def __call__(self, epoch: int, step: int, final: bool) -> None:
        """After an epoch (or the last step): validate when due."""
        if not (final or (epoch + 1) % self.cfg.val_every == 0):
            return
        if self.info.is_main:
            self._validate(epoch, step)
        _barrier(self.info)

    def _validate(self, epoch: int, step: int) -> None:
        rng = capture_rng_state()
        started = time.monotonic()
        try:
            metrics = validate(self.loaded, self.store_path, self.bench.name, self.views)
        finally:
            restore_rng_state(rng)
        self.history.append((step, metrics))
        primary = self.views.primary
        value = metrics.get(primary, math.nan)
        improved = math.isfinite(value) and (self.best is None or value > self.best["value"])
        if improved:
            self.best = {"step": step, "metric": primary, "value": value}
            _keep_best(self.checkpoint_dir, self.best)
        if self.run is not None:
            self.run.log_metrics({f"val/{k}": v for k, v in as_percent(metrics).items()}, step=step)
        self.logger.info("validation at epoch %d step %d (%d views, %.1f s): %s %.1f %%, mIoU base %.1f %%, "
                         "novel %.1f %%%s", epoch + 1, step, len(self.views.items),
                         time.monotonic() - started, primary, 100 * value,
                         100 * metrics.get("fused/miou_base", math.nan),
                         100 * metrics.get("fused/miou_novel", math.nan),
                         " (best so far)" if improved else "")


def _train_model(store_path: Path, bench: Any, preset: str, cfg: TrainConfig, model_cfg: Any, encoder: Any,
                 info: DistInfo, run: Any, run_id: str, checkpoint_dir: Path,
                 payload: dict[str, Any] | None, weights: dict[str, Any],
                 logger: logging.Logger | logging.LoggerAdapter) -> TrainResult:

    seed_everything(cfg.seed)
    # the null class starts at the text embedding of "" (official), in the run's text space
    model = build_model(model_cfg, encoder.dim, null_init=encoder.encode([""])[0])
    if cfg.compile:
        model.compile_heads()
    seed_everything(cfg.seed + 1000 * info.rank)
    base_text = encoder.encode(list(bench.base)).to(info.device)
    dataset = SceneViewDataset(store_path, bench.name, split="train", mode="train", voxel_size=cfg.voxel_size,
                               loop=cfg.loop, seed=cfg.seed, image_size=cfg.image_size,
                               regions=model_cfg.loss.region_captions, augment=cfg.augment)

    def loss_fn(m: nn.Module, batch: dict[str, Any], epoch: int) -> dict[str, torch.Tensor]:
        terms = compute_losses(m(batch, base_text, epoch), batch, model_cfg.loss, epoch)
        return {"loss": terms["total"], **{k: v for k, v in terms.items() if k != "total"}}

    meta = {"preset": preset, "benchmark": bench.name, "run_id": run_id,
            "text_encoder": {"name": encoder.name, "dim": encoder.dim, "spec": model_cfg.text_encoder},
            "model_config": dataclasses.asdict(model_cfg), "pretrained": weights}
    on_log = run.log_metrics if run is not None else None
    loaded = LoadedModel(model, encoder, preset, bench.name, cfg.voxel_size, cfg.image_size,
                         checkpoint_dir / LAST_NAME, run_id)
    skip = pretrained_prefixes(model)
    validator = None
    if cfg.val_every > 0:
        validator = Validator(cfg, store_path, bench, loaded, checkpoint_dir, run, info, logger)
    fitted = fit(model, dataset, collate_scenes, loss_fn, cfg, is_3d=is_3d_parameter,
                 checkpoint_dir=checkpoint_dir, meta=meta, resume=payload, on_log=on_log, info=info,
                 skip_prefixes=skip, on_epoch_end=validator, logger=logger)
    ckpt = checkpoint_dir / LAST_NAME
    metrics: dict[str, float] = {}
    model_uri = version = evaluation = None
    if info.is_main:
        run.log_artifact(ckpt, "checkpoints")
        best = validator.best if validator is not None else None
        chosen = ckpt
        if best is not None:
            run.log_artifact(checkpoint_dir / BEST_NAME, "checkpoints")
            run.set_tags({"best.step": best["step"], "best.metric": f"val/{best['metric']}",
                          "best.value": f"{100 * best['value']:.2f} %"})
            if best["step"] != fitted.step:  # evaluate and register the best model, not the last
                load_model_state(model, load_checkpoint(checkpoint_dir / BEST_NAME)["model"], skip)
                chosen = checkpoint_dir / BEST_NAME
        loaded.checkpoint = chosen
        if cfg.evaluate:
            evaluation = evaluate_loaded(loaded, store_path, bench.name, max_views=cfg.eval_max_views,
                                         ply_scenes=cfg.ply_scenes, logger=logger,
                                         interval_s=cfg.progress_every_s)
            header = (f"Model: `{chosen.name}` of step {best['step'] if best else fitted.step}"
                      + (f", the best by val/{best['metric']} ({100 * best['value']:.1f} %) over "
                         f"{len(validator.views.items)} fixed validation views every {cfg.val_every} epochs "
                         "(chart `val/*`)" if best else " (the last step)")
                      + f"; trained {fitted.step} steps (charts `loss/*`, `lr/*`).")
            log_evaluation(run, evaluation, step=fitted.step, header=header)
            metrics = evaluation.metrics
            version = tracking.register_model(run.tracking_uri, run_id, bench.name, chosen,
                                              hiou=metrics.get("fused/hiou"))
            model_uri = f"models:/{tracking.registered_model_name(bench.name)}/{version}"
        run.set_tags({"steps": fitted.step, "registered_checkpoint": chosen.name})
        run.end()
    # no barrier here: evaluating a large validation set on rank 0 may outlast the collective timeout
    return TrainResult(run_id=run_id, checkpoint_path=ckpt, model_uri=model_uri, metrics=metrics,
                       model_version=version, experiment_id=run.experiment_id if run else None,
                       steps=fitted.step, evaluation=evaluation)
