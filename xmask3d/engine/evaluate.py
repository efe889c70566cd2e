"""Evaluation (XMASK3D_SPEC.md §7): metrics of the 3D, 2D and fused heads over the validation scenes.

`evaluate()` is what `xmask3d evaluate` and the `evaluate/<benchmark>` flow call; training calls
`evaluate_loaded()` on the model it just trained. Every view of every validation scene is run with
all class names through `xmask3d.engine.predict`; the 3D, 2D and fused heads are scored separately.

Besides the IoU over all points, every head gets a *boundary* IoU: the same accumulated per-class
IoU over the points within 5 cm of a ground-truth label change only (`xmask3d.engine.metrics.boundary_mask`,
computed once per scene from the ground truth and the point coordinates).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from storage.benchmarks import Benchmark, get_benchmark
from storage.dataset import SceneViewDataset, collate_scenes, scene_labels
from storage.errors import InputError
from storage.objects import as_path
from storage.store import open_store
from xmask3d.engine import plots, tracking
from xmask3d.engine.metrics import (
    BOUNDARY_RADIUS,
    IGNORE_INDEX,
    ConfusionAccumulator,
    boundary_mask,
    majority_class_baseline,
    split_scores,
)
from xmask3d.engine.panels import scene_panels
from xmask3d.engine.predict import (
    HEADS,
    LoadedModel,
    _index_tensor,
    eval_max_points,
    load_model_for_inference,
    predict_scenes,
    view_labels,
)
from xmask3d.engine.progress import format_duration
from xmask3d.engine.tracking import resolve_model

log = logging.getLogger(__name__)

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
    panels: dict[str, bytes] = field(default_factory=dict)  # xmask3d.engine.panels PNGs by file name

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
    top-down render; xmask3d.engine.panels). Progress (scenes done, views/s, ETA) goes to `logger`
    (default: this module's) every `interval_s` seconds and at the end."""

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
    for done, pred in enumerate(predict_scenes(loaded, as_path(store_path), bench, scene_ids, max_views), 1):
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
    train_labels, _ = train_majority_class(as_path(store_path), bench)
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


def evaluate(store_path: Path, benchmark: str, model: str, tracking_uri: str | None = None,
             max_views: int = 0, ply_scenes: int = 3, log: bool = True, random_init: bool = False,
             logger: logging.Logger | logging.LoggerAdapter | None = None) -> Evaluation:
    """Evaluate a model on the store's validation scenes; logged as a run nested under its training run.

    A ``paper`` model with random Stable Diffusion / CLIP weights is refused unless ``random_init``
    (then the run is tagged ``random_init=true``). Progress lines go to ``logger``."""

    bench = get_benchmark(benchmark)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, train_run = resolve_model(model, tracking_uri, Path(tmp))
        loaded = load_model_for_inference(checkpoint, allow_random=random_init, source=model)
    if loaded.benchmark != bench.name:
        raise InputError(f"{model}: model was trained on {loaded.benchmark}, not {bench.name}")
    evaluation = evaluate_loaded(loaded, as_path(store_path), bench.name, max_views=max_views,
                                 ply_scenes=ply_scenes, logger=logger)
    if log:
        tags = {"mlflow.parentRunId": train_run or loaded.run_id or "", "model": model, "kind": "evaluation"}
        if loaded.random_parts:
            tags.update({"random_init": "true", "random_init.parts": "; ".join(loaded.random_parts)})
        run = tracking.RunTracker(tracking_uri, bench.name, run_name=f"evaluate-{bench.name}",
                                  tags={k: v for k, v in tags.items() if v})
        try:
            run.log_params({"model": model, "store": str(as_path(store_path).resolve()),
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
