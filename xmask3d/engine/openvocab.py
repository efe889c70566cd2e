"""Open-vocabulary experiment: does caption supervision teach the model classes it never saw labelled?

On the synthetic benchmark ``synthetic-b15n4`` (docs/openvocab.md) the novel classes' points never
carry a training label; they reach training only through captions. The runner

1. writes synthetic raw ScanNet scenes (``preprocessing.synthetic.write_scannet``: view captions
   and a detector-captioner's region captions, boxes + phrases);
2. preprocesses them once into ``captions.zarr`` (view captions and region point sets);
3. trains the same model (``xmask3d.engine.train.train``, evaluation on the held-out scenes included) in
   each condition for every seed — ``no-captions`` (every caption loss off), ``official`` (the
   paper's view-caption losses), ``region`` (the region-caption contrastive losses) — and tags
   each MLflow run with its condition and seed;
4. scores two baselines on the same held-out scenes: the majority base class of the training
   scenes (``xmask3d.engine.evaluate``) and a nearest-class-name baseline (each view's points take the
   class whose name embedding is nearest to the view's caption embedding);
5. summarises novel / base mIoU and hIoU per head and condition (mean, min, max over seeds) and
   logs the summary as its own MLflow run.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient

from preprocessing.pipeline import PreprocessConfig, prepare_store, preprocess_scannet_scene
from preprocessing.synthetic import write_scannet
from preprocessing.text import build_text_encoder
from storage.benchmarks import get_benchmark
from storage.dataset import scene_labels
from storage.errors import InputError
from storage.store import open_store
from xmask3d.engine.metrics import ConfusionAccumulator, split_scores
from xmask3d.engine.predict import VoteAccumulator
from xmask3d.engine.tracking import RunTracker
from xmask3d.engine.train import train, train_preset

log = logging.getLogger(__name__)

BENCHMARK = "synthetic-b15n4"
# condition -> (model switches, caption supervision)
CONDITION_SETTINGS: dict[str, tuple[dict[str, bool], str]] = {
    "no-captions": ({"caption_losses": False}, "official"),
    "official": ({}, "official"),
    "region": ({}, "region"),
}
CONDITIONS = tuple(CONDITION_SETTINGS)
HEADS = ("3d", "2d", "fused")
SPLITS = ("miou_base", "miou_novel", "hiou")


@dataclass
class OpenVocabConfig:
    """One experiment: data, training recipe overrides and seeds."""

    benchmark: str = BENCHMARK
    preset: str = "tiny"
    scenes: int = 16  # synthetic scenes; the last max(1, scenes // 4) are held out (val)
    data_seed: int = 0
    seeds: tuple[int, ...] = (0, 1)
    conditions: tuple[str, ...] = CONDITIONS
    # overrides of the `tiny` training recipe (xmask3d.engine.train.TRAIN_PRESETS)
    # 12 training scenes x loop 4 / batch 2 = 24 steps per epoch; 20 epochs = 480 steps, about
    # 4 minutes a run on one core (docs/openvocab.md)
    epochs: int = 20
    loop: int = 4
    batch_size: int = 2
    max_steps: int = 0
    eval_max_views: int = 0
    log_every: int = 8
    augment: bool = False  # the voxeliser rotation/scale augmentation of the 3D input
    # Model switches for every condition. The mask regularisation is off by default: in `tiny` the
    # MaskCLIP image tower is random, so the regularisation pulls 3D features of masks towards
    # random vectors (docs/openvocab.md); with real CLIP weights it belongs on.
    switches: dict[str, bool] = field(default_factory=lambda: {"mask_regularization": False})
    # LossConfig fields set in every run (e.g. {"region_pooling": "mean", "region_3d_weight": 2.0})
    loss_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.conditions) - set(CONDITIONS)
        if unknown or not self.conditions:
            raise InputError(f"conditions must be among {list(CONDITIONS)}, got {list(self.conditions)}")
        if not self.seeds:
            raise InputError("at least one seed is needed")
        if self.scenes < 2:
            raise InputError(f"scenes must be >= 2 (train + held-out), got {self.scenes}")


@dataclass
class RunRecord:
    condition: str
    seed: int
    run_id: str
    steps: int
    seconds: float
    metrics: dict[str, float]


@dataclass
class OpenVocabResult:
    config: OpenVocabConfig
    runs: list[RunRecord]
    baselines: dict[str, dict[str, float]]  # name -> {miou_base, miou_novel, hiou}
    tracking_uri: str
    summary_run_id: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def values(self, condition: str, head: str, split: str) -> list[float]:
        return [r.metrics.get(f"{head}/{split}", math.nan) for r in self.runs if r.condition == condition]

    def mean(self, condition: str, head: str, split: str) -> float:
        values = [v for v in self.values(condition, head, split) if not math.isnan(v)]
        return statistics.fmean(values) if values else math.nan

    def novel_gain(self, head: str = "fused", condition: str = "region") -> list[float]:
        """Per seed: novel mIoU of ``condition`` minus no-captions (seeds present in both)."""
        by = {(r.condition, r.seed): r.metrics.get(f"{head}/miou_novel", math.nan) for r in self.runs}
        return [by[(condition, s)] - by[("no-captions", s)] for s in self.config.seeds
                if (condition, s) in by and ("no-captions", s) in by]

    def table(self) -> str:
        """Markdown table in %: mean [min, max] over seeds per condition and head (mIoU base / novel,
        hIoU, boundary mIoU base / novel), then the baselines."""
        lines = ["| condition | head | mIoU base | mIoU novel | hIoU | bnd base | bnd novel |",
                 "|---|---|---|---|---|---|---|"]

        def cell(values: list[float]) -> str:
            values = [v for v in values if not math.isnan(v)]
            if not values:
                return "–"
            mean = 100 * statistics.fmean(values)
            if len(values) == 1:
                return f"{mean:.1f}"
            return f"{mean:.1f} [{100 * min(values):.1f}, {100 * max(values):.1f}]"

        columns = (*SPLITS, "boundary_miou_base", "boundary_miou_novel")
        for condition in self.config.conditions:
            for head in HEADS:
                cells = [cell(self.values(condition, head, s)) for s in columns]
                lines.append(f"| {condition} | {head} | " + " | ".join(cells) + " |")
        for name, m in self.baselines.items():
            cells = [cell([m.get(s, math.nan)]) for s in columns]
            lines.append(f"| {name} | – | " + " | ".join(cells) + " |")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Data


def prepare_data(out_dir: Path, cfg: OpenVocabConfig, show_progress: bool = True) -> Path:
    """Synthetic raw scenes and their store (view + region captions); reuses complete ones."""

    raw = out_dir / "raw"
    scans = raw / "scans"
    have = len([p for p in scans.iterdir() if p.name.startswith("scene")]) if scans.is_dir() else 0
    if not (raw / "region_captions.json").is_file() or have != cfg.scenes:
        write_scannet(raw, scenes=cfg.scenes, small=True, seed=cfg.data_seed, progress=show_progress)
    store = out_dir / "captions.zarr"
    pcfg = PreprocessConfig(captions=raw / "captions.json", region_captions=raw / "region_captions.json",
                            text_encoder="minilm", show_progress=show_progress)
    listing, pcfg = prepare_store("scannet", raw, store, pcfg)
    for scene_id, split in listing.items():
        summary = preprocess_scannet_scene(raw, scene_id, store, pcfg, split)
        if summary.status == "failed":
            raise InputError(f"{raw}: preprocessing {scene_id} failed: {summary.error}")
    return store


# --------------------------------------------------------------------------------------------
# Nearest-class-name baseline


def caption_name_baseline(store_path: Path, benchmark: str, encoder: Any,
                          scenes: list[str] | None = None) -> dict[str, float]:
    """Each captioned view votes, for all its visible points, the class whose name embedding is
    nearest (cosine) to the view's caption embedding; unseen points take the nearest voted point.
    Uses no model and no training: what matching captions to class names gives on its own."""

    bench = get_benchmark(benchmark)
    store = open_store(store_path)
    names = encoder.encode(list(bench.class_names)).numpy().astype(np.float32)
    names /= np.linalg.norm(names, axis=1, keepdims=True)
    acc = ConfusionAccumulator(bench.num_classes)
    for scene_id in scenes if scenes is not None else store.scene_ids("val"):
        scene = store.scene(scene_id)
        xyz = scene["points/xyz"][:]
        texts = scene["captions/text"][:]
        clip = scene["captions/clip"][:].astype(np.float32)
        votes = VoteAccumulator(len(xyz), bench.num_classes)
        for view in range(scene.num_frames):
            if view >= len(texts) or not str(texts[view]).strip():
                continue
            point, _ = scene.view(view)
            label = int(np.argmax(names @ clip[view]))
            votes.add(point, np.full(len(point), label))
        pred = votes.labels(xyz)
        gt = scene_labels(scene, bench).astype(np.int64)
        if (pred < 0).any():
            pred = np.where(pred < 0, (gt + 1) % bench.num_classes, pred)
        acc.update(pred, gt)
    return split_scores(acc.iou(), bench.base_indices, bench.novel_indices).as_dict()


# --------------------------------------------------------------------------------------------
# The experiment


def train_condition(store: Path, cfg: OpenVocabConfig, condition: str, seed: int, out_dir: Path,
                    tracking_uri: str) -> RunRecord:
    """One training run (with its held-out evaluation) through ``xmask3d.engine.train.train``."""
    overrides: dict[str, Any] = {"seed": seed, "epochs": cfg.epochs, "loop": cfg.loop,
                                 "batch_size": cfg.batch_size, "max_steps": cfg.max_steps,
                                 "eval_max_views": cfg.eval_max_views, "log_every": cfg.log_every,
                                 "augment": cfg.augment,
                                 "ply_scenes": 0, "checkpoint_dir": str(out_dir / "checkpoints")}
    switches, supervision = CONDITION_SETTINGS[condition]
    start = time.monotonic()
    result = train(store, cfg.benchmark, cfg.preset, train_preset(cfg.preset, **overrides),
                   tracking_uri=tracking_uri, switches={**cfg.switches, **switches},
                   caption_supervision=supervision,
                   loss_overrides=cfg.loss_overrides)
    seconds = time.monotonic() - start
    client = MlflowClient(tracking_uri=tracking_uri)
    for key, value in {"openvocab.condition": condition, "openvocab.seed": seed}.items():
        client.set_tag(result.run_id, key, str(value))
    log.info("%s seed %d: %d steps in %.0f s, fused novel mIoU %.3f", condition, seed, result.steps, seconds,
             result.metrics.get("fused/miou_novel", math.nan))
    return RunRecord(condition, seed, result.run_id, result.steps, seconds, dict(result.metrics))


def run_openvocab(out_dir: Path, cfg: OpenVocabConfig | None = None, tracking_uri: str | None = None,
                  show_progress: bool = True) -> OpenVocabResult:
    """The whole experiment (see the module docstring); every run logged to ``tracking_uri``
    (default ``sqlite:///<out_dir>/mlruns.db``)."""

    cfg = cfg or OpenVocabConfig()
    get_benchmark(cfg.benchmark)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: output path exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or f"sqlite:///{(out_dir / 'mlruns.db').resolve()}"
    seconds: dict[str, float] = {}

    start = time.monotonic()
    store = prepare_data(out_dir, cfg, show_progress)
    seconds["data"] = time.monotonic() - start

    runs = []
    start = time.monotonic()
    for seed in cfg.seeds:
        for condition in cfg.conditions:
            runs.append(train_condition(store, cfg, condition, seed, out_dir, uri))
    seconds["train+evaluate"] = time.monotonic() - start

    reference = store
    baselines: dict[str, dict[str, float]] = {}
    first = runs[0].metrics
    baselines["majority-class baseline"] = {s: first.get(f"baseline/{s}", math.nan) for s in SPLITS}
    encoder = build_text_encoder("minilm")
    baselines["nearest-class-name baseline"] = caption_name_baseline(store, cfg.benchmark, encoder)
    result = OpenVocabResult(cfg, runs, baselines, uri, seconds=seconds)

    run = RunTracker(uri, cfg.benchmark, run_name=f"openvocab-{cfg.benchmark}",
                     tags={"kind": "openvocab-summary", "store": str(reference.resolve())})
    try:
        run.log_params({"openvocab": asdict(cfg), "runs": {f"{r.condition}.seed{r.seed}": r.run_id
                                                            for r in runs}})
        metrics = {}
        for condition in cfg.conditions:
            for head in HEADS:
                for split in SPLITS:
                    metrics[f"{condition}/{head}/{split}"] = result.mean(condition, head, split)
        for name, m in baselines.items():
            key = name.split(" ")[0]
            metrics.update({f"{key}/{s}": v for s, v in m.items()})
        for condition in ("official", "region"):
            for head in HEADS:
                gains = result.novel_gain(head, condition)
                if gains:
                    metrics[f"gain/{condition}/{head}/miou_novel_mean"] = statistics.fmean(gains)
                    metrics[f"gain/{condition}/{head}/miou_novel_min"] = min(gains)
        run.log_metrics(metrics, step=0)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "openvocab.md"
            path.write_text(report(result) + "\n")
            run.log_artifact(path, "openvocab")
    except BaseException:
        run.end("FAILED")
        raise
    run.end()
    result.summary_run_id = run.run_id
    return result


def report(result: OpenVocabResult) -> str:
    """The table, the per-seed novel-mIoU differences and the runs, as markdown."""
    cfg = result.config
    lines = [f"{cfg.benchmark}, preset {cfg.preset}, {cfg.scenes} synthetic scenes "
             f"(data seed {cfg.data_seed}), seeds {list(cfg.seeds)}, epochs {cfg.epochs}, loop {cfg.loop}, "
             f"batch {cfg.batch_size}", "", "mean [min, max] over seeds, %:", "", result.table(), ""]
    for condition in ("official", "region"):
        for head in HEADS:
            gains = result.novel_gain(head, condition)
            if gains:
                lines.append(f"novel mIoU gain of {condition} over no-captions, {head} head, per seed: "
                             + ", ".join(f"{100 * g:+.1f}" for g in gains))
    lines.append("")
    for r in result.runs:
        lines.append(f"- {r.condition} seed {r.seed}: run {r.run_id}, {r.steps} steps, {r.seconds:.0f} s")
    if result.summary_run_id:
        lines.append(f"- summary run {result.summary_run_id} ({result.tracking_uri})")
    return "\n".join(lines)
