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
import math
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import nn
from tqdm.auto import tqdm

from preprocessing.benchmarks import Benchmark, get_benchmark
from storage.errors import InputError
from storage.redact import redact, redact_url, secrets_in_url
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

NEG = -1e10
LOG_FLOOR = 1e-30


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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_model_for_inference(checkpoint: Path, device: str | torch.device | None = None) -> LoadedModel:
    """Rebuild the model from the checkpoint's recorded ModelConfig (switches included; the
    preset name only for checkpoints that record none) and load its weights."""
    from xmask3d.config import model_config_from_dict
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
    model = build_model(model_cfg, int(text["dim"]))
    load_model_state(model, payload["model"], pretrained_prefixes(model))
    model.to(device).eval()
    train_cfg = payload.get("train_config") or {}
    return LoadedModel(model=model, encoder=build_text_encoder(text["spec"]), preset=payload["preset"],
                       benchmark=payload["benchmark"], voxel_size=float(train_cfg.get("voxel_size", 0.02)),
                       image_size=tuple(train_cfg.get("image_size", (320, 240))), checkpoint=Path(checkpoint),
                       run_id=payload.get("run_id"))


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
                               image_size=loaded.image_size, scenes=scene_ids)
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
    bar = tqdm(total=len(dataset.items), desc=f"evaluate {bench.name}", unit="view",
               disable=not show_progress)
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
                    panel_views: int = 3) -> Evaluation:
    """Evaluate on the store's validation scenes (or `scenes`): metrics per head + baseline.

    The first `panel_scenes` scenes also get qualitative panels (`panel_views` views each and a
    top-down render; xmask3d.panels)."""
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
    for pred in predict_scenes(loaded, Path(store_path), bench, scene_ids, max_views):
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
    (out_dir / "metrics.json").write_text(json.dumps(evaluation.metrics, indent=1, sort_keys=True))
    for name, png in evaluation.panels.items():
        (out_dir / "panels").mkdir(exist_ok=True)
        (out_dir / "panels" / name).write_bytes(png)
    for example in evaluation.examples:
        plots.write_prediction_plys(out_dir / "ply", str(example["scene_id"]), example["xyz"],
                                    example["pred"], example["gt"], len(names))
    return out_dir


def log_evaluation(run: Any, evaluation: Evaluation, step: int = 0) -> None:
    """Metrics and the artifacts people look at, into an MLflow run (tracking.RunTracker)."""
    run.log_metrics({f"eval/{k}": v for k, v in evaluation.metrics.items()}, step=step)
    with tempfile.TemporaryDirectory() as tmp:
        write_evaluation_artifacts(evaluation, Path(tmp))
        run.log_artifacts(Path(tmp), "evaluation")


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
            reason = redact(str(error), secrets_in_url(uri))
            raise InputError(f"model {model}: not found in the registry at {redact_url(uri)} ({reason})") \
                from None
        found = sorted(local.rglob(LAST_NAME))
        if not found:
            raise InputError(f"model {model}: no checkpoint among its artifacts")
        return found[0], version.run_id
    return tracking.download_run_checkpoint(uri, model, download_dir), model


def evaluate(store_path: Path, benchmark: str, model: str, tracking_uri: str | None = None,
             max_views: int = 0, ply_scenes: int = 3, log: bool = True) -> Evaluation:
    """Evaluate a model on the store's validation scenes; logged as a run nested under its training run."""
    from xmask3d import tracking

    bench = get_benchmark(benchmark)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, train_run = resolve_model(model, tracking_uri, Path(tmp))
        loaded = load_model_for_inference(checkpoint)
    if loaded.benchmark != bench.name:
        raise InputError(f"{model}: model was trained on {loaded.benchmark}, not {bench.name}")
    evaluation = evaluate_loaded(loaded, Path(store_path), bench.name, max_views=max_views,
                                 ply_scenes=ply_scenes)
    if log:
        tags = {"mlflow.parentRunId": train_run or loaded.run_id or "", "model": model, "kind": "evaluation"}
        run = tracking.RunTracker(tracking_uri, bench.name, run_name=f"evaluate-{bench.name}",
                                  tags={k: v for k, v in tags.items() if v})
        try:
            run.log_params({"model": model, "store": str(Path(store_path).resolve()),
                            "protocol": evaluation_protocol(bench, max_views, loaded.encoder.name)})
            log_evaluation(run, evaluation)
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
        "valid_view": "400 < visible points < 65000 (no ground truth used)",
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
