"""Evaluation (XMASK3D_SPEC.md §7): per-view inference, ensembling, votes, metrics, artifacts.

`evaluate()` is what `xmask3d evaluate` and the `evaluate/<benchmark>` flow call; training calls
`evaluate_loaded()` on the model it just trained. Every view of every validation scene is run with
all class names; the 3D, 2D and fused heads are scored separately. The per-point arithmetic:

- :func:`geometric_ensemble`: for points covered by a 2D mask, log(P^r · P_clip^(1−r)) with
  r = base_ratio on base columns and novel_ratio on novel columns; uncovered points keep log P.
  The official code keeps *raw* probabilities for uncovered points and logs for covered ones
  (Q13); the per-point argmax is the same, but a probability of exactly 0 gives NaN there. We
  use log-probabilities everywhere, clamped at 1e-30, so nothing is NaN.
- :func:`gate`: binary-head gating: base-predicted points (sigmoid > threshold) lose the novel
  columns, the others lose the base columns.
- :class:`VoteAccumulator`: votes of every view, argmax per point; points seen by no view take
  the label of the nearest voted point (scipy cKDTree).

Besides the IoU over all points, every head gets a *boundary* IoU: the same accumulated per-class
IoU over the points within 5 cm of a ground-truth label change only (`xmask3d.metrics.boundary_mask`,
computed once per scene from the ground truth and the point coordinates).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import nn

from preprocessing.benchmarks import Benchmark, get_benchmark
from storage.errors import InputError
from xmask3d import plots
from xmask3d.checkpoint import LAST_NAME, load_checkpoint
from xmask3d.metrics import (
    BOUNDARY_RADIUS,
    IGNORE_INDEX,
    ConfusionAccumulator,
    boundary_mask,
    majority_class_baseline,
    split_scores,
)
from xmask3d.progress import format_duration, view_bar

NEG = -1e10
LOG_FLOOR = 1e-30

log = logging.getLogger(__name__)

# Views with more visible points than this are skipped at evaluation (the official `val_keep`,
# XMASK3D_SPEC.md §5 table): 1e7 (no cap in practice) on four ScanNet benchmarks, 65000 on B12N7.
# Benchmarks without an official config (S3DIS) keep the training cap, 65000.
VAL_KEEP = {"scannet20-b15n4": 10_000_000, "scannet20-b12n7": 65_000, "scannet20-b10n9": 10_000_000,
            "scannet200-b170n30": 10_000_000, "scannet200-b150n50": 10_000_000}
DEFAULT_VAL_KEEP = 65_000


def eval_max_points(benchmark: str) -> int:
    """The evaluation's visible-point cap of a view for ``benchmark`` (official ``val_keep``)."""
    return VAL_KEEP.get(benchmark, DEFAULT_VAL_KEEP)


def geometric_ensemble(prob: torch.Tensor, prob_clip: torch.Tensor, covered: torch.Tensor,
                       base_indices: torch.Tensor, novel_indices: torch.Tensor, base_ratio: float,
                       novel_ratio: float) -> torch.Tensor:
    """Log-scores [N,T]: covered points mix model and MaskCLIP probabilities geometrically."""
    log_p = prob.clamp_min(LOG_FLOOR).log()
    log_c = prob_clip.clamp_min(LOG_FLOOR).log()
    ratio = torch.full((prob.shape[1],), base_ratio, dtype=prob.dtype, device=prob.device)
    ratio[novel_indices] = novel_ratio
    mixed = ratio * log_p + (1 - ratio) * log_c
    return torch.where(covered[:, None], mixed, log_p)


def gate(scores: torch.Tensor, binary_prob: torch.Tensor, base_indices: torch.Tensor,
         novel_indices: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mask the novel columns of base-predicted points and the base columns of the others."""
    is_base = binary_prob > threshold
    out = scores.clone()
    novel_mask = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
    novel_mask[novel_indices] = True
    base_mask = torch.zeros_like(novel_mask)
    base_mask[base_indices] = True
    out[is_base[:, None] & novel_mask[None, :]] = NEG
    out[~is_base[:, None] & base_mask[None, :]] = NEG
    return out


def fill_from_nearest(values: torch.Tensor, has_value: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
    """Rows without a value take the row of the nearest point that has one (same view)."""
    if bool(has_value.all()) or not bool(has_value.any()):
        return values
    src = np.flatnonzero(has_value.cpu().numpy())
    dst = np.flatnonzero(~has_value.cpu().numpy())
    _, nearest = cKDTree(xyz[src].cpu().numpy()).query(xyz[dst].cpu().numpy(), k=1)
    out = values.clone()
    out[torch.from_numpy(dst).to(values.device)] = values[torch.from_numpy(src[nearest]).to(values.device)]
    return out


class VoteAccumulator:
    """scene_pred[point, label] += 1 over views; argmax; unseen points from the nearest seen one."""

    def __init__(self, num_points: int, num_classes: int) -> None:
        self.votes = np.zeros((num_points, num_classes), dtype=np.int32)

    def add(self, point_index: np.ndarray, labels: np.ndarray) -> None:
        rows = np.asarray(point_index, dtype=np.int64)
        np.add.at(self.votes, (rows, np.asarray(labels, dtype=np.int64)), 1)

    @property
    def seen(self) -> np.ndarray:
        return self.votes.sum(1) > 0

    def labels(self, xyz: np.ndarray) -> np.ndarray:
        """Per-point labels of the whole scene (-1 everywhere if no view voted)."""
        seen = self.seen
        labels = self.votes.argmax(1).astype(np.int64)
        if not seen.any():
            return np.full(len(labels), -1, dtype=np.int64)
        if not seen.all():
            _, nearest = cKDTree(xyz[seen]).query(xyz[~seen], k=1)
            labels[~seen] = labels[seen][nearest]
        return labels


# --------------------------------------------------------------------------------------------
# Loading a model


@dataclass
class LoadedModel:
    """A model ready for inference, with what evaluation needs to know about its training."""

    model: nn.Module
    encoder: Any  # xmask3d.text.TextEncoder
    preset: str
    benchmark: str
    voxel_size: float = 0.02
    image_size: tuple[int, int] = (320, 240)
    checkpoint: Path | None = None
    run_id: str | None = None
    random_parts: tuple[str, ...] = ()  # paper parts with random weights (xmask3d.config.missing_pretrained)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_model_for_inference(checkpoint: Path, device: str | torch.device | None = None,
                             allow_random: bool = True, source: str | None = None) -> LoadedModel:
    """Rebuild the model from the checkpoint's recorded ModelConfig (switches included; the
    preset name only for checkpoints that record none) and load its weights. With
    ``allow_random=False`` a ``paper`` model whose Stable Diffusion / CLIP weights would be random
    (trained with --random-init, or its weight files missing here) is an InputError naming them."""
    from xmask3d.config import missing_pretrained, model_config_from_dict
    from xmask3d.config import preset as model_preset
    from xmask3d.model import build_model
    from xmask3d.text import build_text_encoder
    from xmask3d.train import load_model_state, pretrained_prefixes

    payload = load_checkpoint(checkpoint)
    text = payload.get("text_encoder") or {}
    if "spec" not in text or "dim" not in text:
        raise InputError(f"{checkpoint}: checkpoint records no text encoder")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = payload.get("pretrained") or {}
    if payload.get("model_config") is not None:
        model_cfg = model_config_from_dict(payload["model_config"], str(checkpoint))
    else:
        model_cfg = model_preset(payload["preset"], sd_dir=weights.get("sd_dir"),
                                 clip_checkpoint=weights.get("clip_checkpoint"))
    random_parts = missing_pretrained(model_cfg)
    if random_parts and not allow_random:
        raise InputError(f"{source or checkpoint}: {model_cfg.name} model with random weights: "
                         f"{'; '.join(random_parts)} (pass --random-init to evaluate it anyway)")
    model = build_model(model_cfg, int(text["dim"]))
    load_model_state(model, payload["model"], pretrained_prefixes(model))
    model.to(device).eval()
    train_cfg = payload.get("train_config") or {}
    return LoadedModel(model=model, encoder=build_text_encoder(text["spec"]), preset=payload["preset"],
                       benchmark=payload["benchmark"], voxel_size=float(train_cfg.get("voxel_size", 0.02)),
                       image_size=tuple(train_cfg.get("image_size", (320, 240))), checkpoint=Path(checkpoint),
                       run_id=payload.get("run_id"), random_parts=tuple(random_parts))


# --------------------------------------------------------------------------------------------
# Per-view scores and per-scene predictions

HEADS = ("3d", "2d", "fused")


def _index_tensor(indices: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(np.asarray(indices, dtype=np.int64).tolist(), dtype=torch.long, device=device)


def view_labels(out: dict[str, Any], text: torch.Tensor, coord: torch.Tensor, bench: Benchmark,
                gating_threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Gated argmax labels [N] of the 3D, 2D and fused heads for one view (batch of one).

    `text` [T,D] L2-normalised class embeddings; scores are softmax(s·cos) with the model's
    logit scale s; the fused head is ensembled with the MaskCLIP embeddings of the final masks.
    """
    scale = float(out["logit_scale"])
    device = out["feats_3d"].device
    text = text.to(device)
    base_idx = _index_tensor(bench.base_indices, device)
    novel_idx = _index_tensor(bench.novel_indices, device)

    def probs(feat: torch.Tensor) -> torch.Tensor:
        return (scale * F.normalize(feat.float(), dim=-1) @ text.T).softmax(-1)

    covered = out["covered"].to(torch.bool)
    binary_logit = out.get("binary_logit")
    p3 = probs(out["feats_3d"])
    p2 = probs(fill_from_nearest(out["feats_2d"], covered, coord.to(device)))
    pf = probs(out["feats_fused"])
    pc = torch.zeros_like(pf)
    if bool(covered.any()):
        mask_clip = out["mask_clip"][0]
        pc[covered] = probs(mask_clip[out["point_mask"][covered].long()])
    fused = geometric_ensemble(pf, pc, covered, base_idx, novel_idx, bench.base_ratio, bench.novel_ratio)
    scores = {"3d": p3.clamp_min(LOG_FLOOR).log(), "2d": p2.clamp_min(LOG_FLOOR).log(), "fused": fused}
    if binary_logit is None:  # a model without the binary head (ablation): no base/novel gating
        return {h: s.argmax(1) for h, s in scores.items()}
    binary = binary_logit.float().sigmoid().reshape(-1)
    return {h: gate(s, binary, base_idx, novel_idx, gating_threshold).argmax(1) for h, s in scores.items()}


@dataclass
class ScenePrediction:
    scene_id: str
    labels: np.ndarray  # fused head, every point of the scene
    class_names: tuple[str, ...]
    heads: dict[str, np.ndarray] = field(default_factory=dict)
    views: int = 0
    seen_fraction: float = 0.0


def predict_scenes(loaded: LoadedModel, store_path: Path, bench: Benchmark, scene_ids: list[str],
                   max_views: int = 0, show_progress: bool = True) -> Iterator[ScenePrediction]:
    """Per-view inference over the views of each scene, votes across views, nearest fill."""
    from storage.dataset import SceneViewDataset, collate_scenes
    from storage.store import open_store

    dataset = SceneViewDataset(store_path, bench.name, split="val", mode="eval", voxel_size=loaded.voxel_size,
                               image_size=loaded.image_size, scenes=scene_ids,
                               max_points=eval_max_points(bench.name))
    if max_views:
        counts: dict[str, int] = {}
        kept = []
        for scene_id, view in dataset.items:
            counts[scene_id] = counts.get(scene_id, 0) + 1
            if counts[scene_id] <= max_views:
                kept.append((scene_id, view))
        dataset.items = kept
    store = open_store(store_path)
    text = F.normalize(loaded.encoder.encode(list(bench.class_names)).float(), dim=-1)
    is_base = torch.zeros(bench.num_classes, dtype=torch.bool)
    is_base[_index_tensor(bench.base_indices)] = True
    loaded.model.eval()
    by_scene: dict[str, list[int]] = {}
    for i, (scene_id, _) in enumerate(dataset.items):
        by_scene.setdefault(scene_id, []).append(i)
    bar = view_bar(len(dataset.items), f"evaluate {bench.name}", show_progress)
    for scene_id in scene_ids:
        xyz = store.scene(scene_id)["points/xyz"][:]
        votes = {h: VoteAccumulator(len(xyz), bench.num_classes) for h in HEADS}
        for i in by_scene.get(scene_id, []):
            batch = collate_scenes([dataset[i]])
            with torch.no_grad():
                out = loaded.model.infer(batch, text, is_base=is_base)
            labels = view_labels(out, text, batch["coord"], bench)
            for head, value in labels.items():
                votes[head].add(batch["point_index"].numpy(), value.cpu().numpy())
            bar.update(1)
        heads = {h: v.labels(xyz) for h, v in votes.items()}
        yield ScenePrediction(scene_id, heads["fused"], tuple(bench.class_names), heads,
                              views=len(by_scene.get(scene_id, [])),
                              seen_fraction=float(votes["fused"].seen.mean()))
    bar.close()


def predict_scene(loaded: LoadedModel, store_path: Path, scene_id: str, benchmark: str | None = None
                  ) -> ScenePrediction:
    """Fused-head labels of every point of one stored scene (the pyfunc model's predict)."""
    from storage.store import open_store

    bench = get_benchmark(benchmark or loaded.benchmark)
    store = open_store(store_path)
    if scene_id not in store.scene_ids():
        raise InputError(f"{store_path}: no scene {scene_id!r}")
    return next(predict_scenes(loaded, Path(store_path), bench, [scene_id], show_progress=False))


# --------------------------------------------------------------------------------------------
# Evaluation over the validation scenes


@dataclass
class Evaluation:
    """Metrics of the 3D, 2D and fused heads plus the majority-class baseline, and what to plot."""

    benchmark: str
    # "<head>/<miou_base|miou_novel|hiou|miou_all>", "<head>/boundary_<same>", "baseline/...",
    # "boundary/points" (fraction of the labelled points that are boundary points)
    metrics: dict[str, float]
    ious: dict[str, np.ndarray]  # head -> per-class IoU
    confusion: dict[str, np.ndarray]  # head -> T×T confusion matrix
    class_names: tuple[str, ...]
    novel_indices: tuple[int, ...]
    scenes: list[str]
    examples: list[dict[str, np.ndarray | str]] = field(default_factory=list)  # for PLY export
    run_id: str | None = None
    panels: dict[str, bytes] = field(default_factory=dict)  # xmask3d.panels PNGs by file name

    def table(self, extra_rows: Mapping[str, Mapping[str, float]] | None = None) -> str:
        """Plain-text table: one row per head (and the baseline), mIoU base / novel / hIoU / all and
        the boundary mIoU base / novel / hIoU, in % ("–" where a value is missing or NaN).
        ``extra_rows``: more baselines by name, each ``{"miou_base": ..., ...}`` (fractions)."""
        columns = (("mIoU base", "miou_base"), ("mIoU novel", "miou_novel"), ("hIoU", "hiou"),
                   ("mIoU all", "miou_all"), ("bnd base", "boundary_miou_base"),
                   ("bnd novel", "boundary_miou_novel"), ("bnd hIoU", "boundary_hiou"))
        rows = [("head", *(title for title, _ in columns))]
        for head in (*HEADS, "baseline"):
            m = self.metrics
            rows.append((head if head != "baseline" else "majority-class baseline",
                         *(f"{100 * m[f'{head}/{k}']:.1f}" if not math.isnan(m.get(f"{head}/{k}", math.nan))
                           else "–" for _, k in columns)))
        for name, values in (extra_rows or {}).items():
            rows.append((name, *(f"{100 * values[k]:.1f}" if not math.isnan(values.get(k, math.nan))
                                 else "–" for _, k in columns)))
        width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                   enumerate(zip(r, width, strict=True))) for r in rows)


def train_majority_class(store_path: Path, bench: Benchmark) -> tuple[list[np.ndarray], list[str]]:
    """Labels a model may learn from in the training scenes (novel classes ignored)."""
    from storage.dataset import scene_labels
    from storage.store import open_store

    store = open_store(store_path)
    novel = np.zeros(256, dtype=bool)
    novel[np.asarray(bench.novel_indices)] = True
    labels = []
    ids = store.scene_ids("train")
    for scene_id in ids:
        label = scene_labels(store.scene(scene_id), bench).astype(np.int64)
        labels.append(np.where(novel[label], IGNORE_INDEX, label))
    return labels, ids


def evaluate_loaded(loaded: LoadedModel, store_path: Path, benchmark: str, max_views: int = 0,
                    ply_scenes: int = 3, scenes: list[str] | None = None, panel_scenes: int = 2,
                    panel_views: int = 3, logger: logging.Logger | logging.LoggerAdapter | None = None,
                    interval_s: float = 60.0) -> Evaluation:
    """Evaluate on the store's validation scenes (or `scenes`): metrics per head + baseline.

    The first `panel_scenes` scenes also get qualitative panels (`panel_views` views each and a
    top-down render; xmask3d.panels). Progress (scenes done, views/s, ETA) goes to `logger`
    (default: this module's) every `interval_s` seconds and at the end."""
    from storage.dataset import scene_labels
    from storage.store import open_store
    from xmask3d.panels import scene_panels

    bench = get_benchmark(benchmark)
    store = open_store(store_path)
    scene_ids = scenes if scenes is not None else store.scene_ids("val")
    if not scene_ids:
        raise InputError(f"{store_path}: no validation scenes")
    T = bench.num_classes
    acc = {h: ConfusionAccumulator(T) for h in HEADS}
    boundary_acc = {h: ConfusionAccumulator(T) for h in HEADS}  # boundary points only
    boundary_points = labelled_points = 0
    gts, examples = [], []
    panels: dict[str, bytes] = {}
    panel_ids: list[str] = []
    logger = logger if logger is not None else log
    started = last_line = time.monotonic()
    views_done = 0
    for done, pred in enumerate(predict_scenes(loaded, Path(store_path), bench, scene_ids, max_views), 1):
        views_done += pred.views
        now = time.monotonic()
        if now - last_line >= interval_s or done == len(scene_ids):
            last_line = now
            rate = views_done / (now - started) if now > started else math.nan
            left = (now - started) / done * (len(scene_ids) - done)
            logger.info("evaluate %s: scene %d/%d, %d views, %.2f views/s, ETA %s", bench.name, done,
                        len(scene_ids), views_done, rate, format_duration(left))
        scene = store.scene(pred.scene_id)
        gt = scene_labels(scene, bench).astype(np.int64)
        gts.append(gt)
        xyz = scene["points/xyz"][:]
        boundary = boundary_mask(xyz, gt, BOUNDARY_RADIUS)
        boundary_points += int(boundary.sum())
        labelled_points += int((gt != IGNORE_INDEX).sum())
        for head in HEADS:
            labels = pred.heads[head]
            if (labels < 0).any():  # no valid view at all: every point counts as wrong
                labels = np.where(labels < 0, (gt + 1) % T, labels)
            acc[head].update(labels, gt)
            boundary_acc[head].update(labels[boundary], gt[boundary])
        if len(panel_ids) < panel_scenes:
            panel_ids.append(pred.scene_id)
            panels.update(scene_panels(scene, gt, pred.heads, bench.class_names, bench.novel_indices,
                                       views=panel_views))
        if len(examples) < ply_scenes:
            examples.append({"scene_id": pred.scene_id, "xyz": xyz, "gt": gt,
                             "pred": pred.heads["fused"]})
    train_labels, _ = train_majority_class(Path(store_path), bench)
    majority, baseline = majority_class_baseline(train_labels, gts, T)
    metrics: dict[str, float] = {}
    ious = {h: a.iou() for h, a in acc.items()}
    for head in HEADS:
        metrics.update(split_scores(ious[head], bench.base_indices, bench.novel_indices).as_dict(f"{head}/"))
        metrics[f"{head}/accuracy"] = acc[head].accuracy()
        metrics.update(split_scores(boundary_acc[head].iou(), bench.base_indices, bench.novel_indices)
                       .as_dict(f"{head}/boundary_"))
    metrics["boundary/points"] = boundary_points / labelled_points if labelled_points else math.nan
    metrics.update(split_scores(baseline.iou(), bench.base_indices, bench.novel_indices).as_dict("baseline/"))
    metrics["baseline/majority_class"] = float(majority)
    for name, value in zip(bench.class_names, ious["fused"], strict=True):
        metrics[f"fused/iou/{name}"] = float(value)
    return Evaluation(bench.name, metrics, ious, {h: a.matrix for h, a in acc.items()},
                      tuple(bench.class_names), tuple(int(i) for i in bench.novel_indices), list(scene_ids),
                      examples, panels=panels)


def write_evaluation_artifacts(evaluation: Evaluation, out_dir: Path) -> Path:
    """Bar chart, confusion matrix, markdown IoU table, metrics JSON, PLY pairs and the qualitative
    panels (`panels/`) under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names, novel = evaluation.class_names, evaluation.novel_indices
    plots.iou_bar_chart(out_dir / "iou_per_class.png", names, evaluation.ious, novel,
                        f"{evaluation.benchmark}: per-class IoU")
    plots.confusion_matrix_png(out_dir / "confusion_fused.png", evaluation.confusion["fused"], names,
                               f"{evaluation.benchmark}: fused head")
    table = plots.iou_markdown_table(names, evaluation.ious, novel)
    summary = "\n".join(["", "```", evaluation.table(), "```", ""])
    title = f"# {evaluation.benchmark}: per-class IoU (%)"
    (out_dir / "iou_per_class.md").write_text(f"{title}\n\n{table}{summary}")
    (out_dir / "metrics.json").write_text(json.dumps(
        {"unit": "percent", "benchmark": evaluation.benchmark, "metrics": as_percent(evaluation.metrics),
         "majority_class": majority_class_name(evaluation)}, indent=1, sort_keys=True))
    for name, png in evaluation.panels.items():
        (out_dir / "panels").mkdir(exist_ok=True)
        (out_dir / "panels" / name).write_bytes(png)
    for example in evaluation.examples:
        plots.write_prediction_plys(out_dir / "ply", str(example["scene_id"]), example["xyz"],
                                    example["pred"], example["gt"], len(names))
    return out_dir


# Metrics that are not scores (a class index): logged as they are, never scaled to percent.
NOT_PERCENT = ("baseline/majority_class",)


def as_percent(metrics: Mapping[str, float]) -> dict[str, float]:
    """Scores in percent (what MLflow, tables, PNGs and metrics.json show); ``Evaluation.metrics``
    and the Python API keep fractions in [0, 1]."""
    return {k: (v if k in NOT_PERCENT else 100.0 * v) for k, v in metrics.items()}


def majority_class_name(evaluation: Evaluation) -> str | None:
    index = evaluation.metrics.get("baseline/majority_class")
    if index is None or not math.isfinite(index) or not 0 <= int(index) < len(evaluation.class_names):
        return None
    return evaluation.class_names[int(index)]


EVAL_ARTIFACTS = "evaluation"


def run_description(evaluation: Evaluation, run_id: str, header: str = "",
                    artifact_dir: str = EVAL_ARTIFACTS) -> str:
    """Markdown for the MLflow run page (``mlflow.note.content``): the headline scores (%) and
    links to the panels, charts and PLY files. Links are relative ``get-artifact`` URLs of the
    tracking server, so they open from the run page of any MLflow UI serving this run."""
    def link(path: str) -> str:
        return f"get-artifact?path={artifact_dir}/{path}&run_uuid={run_id}"

    m = as_percent(evaluation.metrics)

    def pct(key: str) -> str:
        value = m.get(key, math.nan)
        return "–" if not math.isfinite(value) else f"{value:.1f}"

    lines = [header.rstrip(), ""] if header else []
    lines += [f"### {evaluation.benchmark}: {len(evaluation.scenes)} validation scenes (scores in %)", "",
              "| head | mIoU base | mIoU novel | hIoU | mIoU all |", "|---|---|---|---|---|"]
    for head in (*HEADS, "baseline"):
        lines.append(f"| {head} | {pct(f'{head}/miou_base')} | {pct(f'{head}/miou_novel')} | "
                     f"{pct(f'{head}/hiou')} | {pct(f'{head}/miou_all')} |")
    lines += ["", f"Charts: [per-class IoU]({link('iou_per_class.png')}), "
              f"[confusion (fused)]({link('confusion_fused.png')}), [table]({link('iou_per_class.md')}), "
              f"[metrics.json]({link('metrics.json')})"]
    if evaluation.panels:
        lines += ["", "Panels (image, ground truth, 3D / 2D / fused):", ""]
        lines += [f"[![{name}]({link('panels/' + name)})]({link('panels/' + name)})"
                  for name in sorted(evaluation.panels)]
    if evaluation.examples:
        lines += ["", "Point clouds (binary PLY, class colours; open in MeshLab / CloudCompare):", ""]
        for example in evaluation.examples:
            scene = str(example["scene_id"])
            lines.append(f"- {scene}: [prediction]({link(f'ply/{scene}_pred.ply')}), "
                         f"[ground truth]({link(f'ply/{scene}_gt.ply')})")
    return "\n".join(lines) + "\n"


def log_evaluation(run: Any, evaluation: Evaluation, step: int = 0, header: str = "") -> None:
    """Metrics (``eval/<key>``, in %) and the artifacts people look at, into an MLflow run
    (tracking.RunTracker); the run description links the panels and PLY files."""
    run.log_metrics({f"eval/{k}": v for k, v in as_percent(evaluation.metrics).items()}, step=step)
    with tempfile.TemporaryDirectory() as tmp:
        write_evaluation_artifacts(evaluation, Path(tmp))
        run.log_artifacts(Path(tmp), EVAL_ARTIFACTS)
    majority = majority_class_name(evaluation)
    run.set_tags({"mlflow.note.content": run_description(evaluation, run.run_id, header),
                  **({"baseline.majority_class": majority} if majority else {})})


# --------------------------------------------------------------------------------------------
# Validation during training: a fixed subset of validation views, the visible points of each


@dataclass(frozen=True)
class ValidationSet:
    """The views validated every ``val_every`` epochs, and the score that picks the best model."""

    items: tuple[tuple[str, int], ...]  # (scene id, view index)
    has_novel: bool  # novel classes occur among the visible points of these views

    @property
    def primary(self) -> str:
        """fused hIoU when the views show novel classes, else fused mIoU over all classes."""
        return "fused/hiou" if self.has_novel else "fused/miou_all"


def validation_set(store_path: Path, benchmark: str, count: int, seed: int = 0) -> ValidationSet:
    """``count`` views of the store's validation scenes, fixed for a run: the valid views of each
    scene in a seeded random order, taken round-robin over the scenes (so every scene is in the
    subset before any scene gives a second view)."""
    from storage.dataset import SceneViewDataset, scene_labels
    from storage.store import open_store

    bench = get_benchmark(benchmark)
    dataset = SceneViewDataset(store_path, bench.name, split="val", mode="eval",
                               max_points=eval_max_points(bench.name))
    rng = np.random.default_rng(seed)
    queues = {sid: [int(v) for v in rng.permutation(views)] for sid, views in dataset.valid_views.items()}
    items: list[tuple[str, int]] = []
    while len(items) < count and any(queues.values()):
        for sid in dataset.scene_ids:
            if queues[sid] and len(items) < count:
                items.append((sid, queues[sid].pop(0)))
    store = open_store(store_path)
    novel = np.zeros(256, dtype=bool)
    novel[np.asarray(bench.novel_indices)] = True
    has_novel = False
    for sid in sorted({sid for sid, _ in items}):
        scene = store.scene(sid)
        labels = scene_labels(scene, bench)
        offsets = scene["proj/offsets"][:]
        points = scene["proj/point"]
        for view in (v for s, v in items if s == sid):
            if novel[labels[points[int(offsets[view]):int(offsets[view + 1])]]].any():
                has_novel = True
                break
        if has_novel:
            break
    return ValidationSet(tuple(items), has_novel)


def validate(loaded: LoadedModel, store_path: Path, benchmark: str, views: ValidationSet) -> dict[str, float]:
    """Scores (fractions) of the 3D, 2D and fused heads over the visible points of ``views``: the
    evaluation's per-view labels, accumulated over the views, without multi-view votes (a subset
    of views cannot vote for a whole scene)."""
    from storage.dataset import SceneViewDataset, collate_scenes

    bench = get_benchmark(benchmark)
    scenes = sorted({sid for sid, _ in views.items})
    dataset = SceneViewDataset(store_path, bench.name, split="val", mode="eval", voxel_size=loaded.voxel_size,
                               image_size=loaded.image_size, scenes=scenes,
                               max_points=eval_max_points(bench.name))
    dataset.items = list(views.items)
    text = F.normalize(loaded.encoder.encode(list(bench.class_names)).float(), dim=-1)
    is_base = torch.zeros(bench.num_classes, dtype=torch.bool)
    is_base[_index_tensor(bench.base_indices)] = True
    acc = {h: ConfusionAccumulator(bench.num_classes) for h in HEADS}
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        for i in range(len(dataset)):
            batch = collate_scenes([dataset[i]])
            with torch.no_grad():
                out = loaded.model.infer(batch, text, is_base=is_base)
            for head, labels in view_labels(out, text, batch["coord"], bench).items():
                acc[head].update(labels.cpu().numpy(), batch["label"].numpy())
    finally:
        loaded.model.train(was_training)
    metrics: dict[str, float] = {}
    for head in HEADS:
        scores = split_scores(acc[head].iou(), bench.base_indices, bench.novel_indices)
        metrics.update(scores.as_dict(f"{head}/"))
        metrics[f"{head}/accuracy"] = acc[head].accuracy()
    return metrics


def resolve_model(model: str, tracking_uri: str | None, download_dir: Path) -> tuple[Path, str | None]:
    """`models:/NAME@alias`, `models:/NAME/VERSION`, an MLflow run id or a checkpoint path
    -> (local checkpoint file, training run id if known)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from xmask3d import tracking

    path = Path(model)
    if path.exists():
        return (path / LAST_NAME if path.is_dir() else path), None
    if not model.startswith("models:/") and ("/" in model or "." in model):
        raise InputError(f"{model}: checkpoint not found")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking_available(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if model.startswith("models:/"):
        ref = model[len("models:/"):]
        try:
            if "@" in ref:
                name, alias = ref.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, number = ref.rsplit("/", 1)
                version = client.get_model_version(name, number)
            import mlflow
            import mlflow.artifacts

            # models:/ resolution reads the process-wide URIs (the argument alone is not enough)
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(download_dir)))
        except (MlflowException, ValueError) as error:
            raise InputError(f"model {model}: not found in the registry at {uri} ({error})") from error
        found = sorted(local.rglob("*.pt"))  # the registered checkpoint: best.pt or last.pt
        if not found:
            raise InputError(f"model {model}: no checkpoint among its artifacts")
        return found[0], version.run_id
    return tracking.download_run_checkpoint(uri, model, download_dir), model


def evaluate(store_path: Path, benchmark: str, model: str, tracking_uri: str | None = None,
             max_views: int = 0, ply_scenes: int = 3, log: bool = True, random_init: bool = False,
             logger: logging.Logger | logging.LoggerAdapter | None = None) -> Evaluation:
    """Evaluate a model on the store's validation scenes; logged as a run nested under its training run.

    A ``paper`` model with random Stable Diffusion / CLIP weights is refused unless ``random_init``
    (then the run is tagged ``random_init=true``). Progress lines go to ``logger``."""
    from xmask3d import tracking

    bench = get_benchmark(benchmark)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, train_run = resolve_model(model, tracking_uri, Path(tmp))
        loaded = load_model_for_inference(checkpoint, allow_random=random_init, source=model)
    if loaded.benchmark != bench.name:
        raise InputError(f"{model}: model was trained on {loaded.benchmark}, not {bench.name}")
    evaluation = evaluate_loaded(loaded, Path(store_path), bench.name, max_views=max_views,
                                 ply_scenes=ply_scenes, logger=logger)
    if log:
        tags = {"mlflow.parentRunId": train_run or loaded.run_id or "", "model": model, "kind": "evaluation"}
        if loaded.random_parts:
            tags.update({"random_init": "true", "random_init.parts": "; ".join(loaded.random_parts)})
        run = tracking.RunTracker(tracking_uri, bench.name, run_name=f"evaluate-{bench.name}",
                                  tags={k: v for k, v in tags.items() if v})
        try:
            run.log_params({"model": model, "store": str(Path(store_path).resolve()),
                            "protocol": evaluation_protocol(bench, max_views, loaded.encoder.name)})
            header = f"Evaluation of `{model}` (checkpoint `{checkpoint.name}`)."
            log_evaluation(run, evaluation, header=header)
        except BaseException:
            run.end("FAILED")
            raise
        run.end()
        evaluation.run_id = run.run_id
    return evaluation


def evaluation_protocol(bench: Benchmark, max_views: int, text_encoder: str) -> dict[str, Any]:
    """How the reported numbers are computed; logged as MLflow params (``protocol.*``)."""
    return {
        "split": "val",
        "views": f"first {max_views} valid views per scene" if max_views
        else "every valid view of each scene",
        "valid_view": f"400 < visible points < {eval_max_points(bench.name)} (the official val_keep of the "
                      "benchmark; no ground truth used)",
        "view_points": "only the points visible in the view, as in training; no test-time augmentation",
        "text": f"bare class names of all {bench.num_classes} classes, {text_encoder}, no template",
        "binary_gating_threshold": 0.5,
        "ensemble": "geometric P^r * P_maskclip^(1-r) on mask-covered points, log-probs everywhere",
        "base_ratio": bench.base_ratio,
        "novel_ratio": bench.novel_ratio,
        "multiview": "one vote per view per point, argmax",
        "unseen_points": "label of the nearest voted point (scipy cKDTree)",
        "ignore": "label 255 (unannotated points and the benchmark's ignored classes)",
        "iou": "intersection/union summed over all scenes; classes with empty union left out of means",
        "miou": "mean IoU over base classes, over novel classes; hIoU = 2BN/(B+N)",
        "boundary": f"boundary IoU: the same IoU over the points with another valid ground-truth label "
                    f"within {BOUNDARY_RADIUS} m only (scipy cKDTree)",
        "heads": "3d = pure 3D, 2d = mask embeddings (nearest fill), fused = fused + MaskCLIP ensemble",
        "baseline": "majority base class of the training scenes predicted everywhere",
        "base_classes": list(bench.base),
        "novel_classes": list(bench.novel),
    }
