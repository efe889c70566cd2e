"""Inference (XMASK3D_SPEC.md §7): load a model for inference, score one view, vote over views.

`load_model_for_inference` rebuilds a model from a checkpoint; `predict_scenes`/`predict_scene`
run every view of a scene with all class names and vote per point. Evaluation, the panels and the
MLflow pyfunc model all predict through this module. The per-point arithmetic:

- :func:`geometric_ensemble`: for points covered by a 2D mask, log(P^r · P_clip^(1−r)) with
  r = base_ratio on base columns and novel_ratio on novel columns; uncovered points keep log P.
  The official code keeps *raw* probabilities for uncovered points and logs for covered ones
  (Q13); the per-point argmax is the same, but a probability of exactly 0 gives NaN there. We
  use log-probabilities everywhere, clamped at 1e-30, so nothing is NaN.
- :func:`gate`: binary-head gating: base-predicted points (sigmoid > threshold) lose the novel
  columns, the others lose the base columns.
- :class:`VoteAccumulator`: votes of every view, argmax per point; points seen by no view take
  the label of the nearest voted point (scipy cKDTree).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import nn

from preprocessing.text import build_text_encoder
from storage.benchmarks import Benchmark, get_benchmark
from storage.dataset import SceneViewDataset, collate_scenes
from storage.errors import InputError
from storage.objects import as_path
from storage.store import open_store
from xmask3d.engine.checkpoint import load_checkpoint, load_model_state, pretrained_prefixes
from xmask3d.engine.progress import view_bar
from xmask3d.network.config import missing_pretrained, model_config_from_dict
from xmask3d.network.config import preset as model_preset
from xmask3d.network.model import build_model

NEG = -1e10
LOG_FLOOR = 1e-30

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
    encoder: Any  # preprocessing.text.TextEncoder
    preset: str
    benchmark: str
    voxel_size: float = 0.02
    image_size: tuple[int, int] = (320, 240)
    checkpoint: Path | None = None
    run_id: str | None = None
    random_parts: tuple[str, ...] = ()  # paper parts with random weights (network.config.missing_pretrained)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_model_for_inference(checkpoint: Path, device: str | torch.device | None = None,
                             allow_random: bool = True, source: str | None = None) -> LoadedModel:
    """Rebuild the model from the checkpoint's recorded ModelConfig (switches included; the
    preset name only for checkpoints that record none) and load its weights. With
    ``allow_random=False`` a ``paper`` model whose Stable Diffusion / CLIP weights would be random
    (trained with --random-init, or its weight files missing here) is an InputError naming them."""

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

    bench = get_benchmark(benchmark or loaded.benchmark)
    store = open_store(store_path)
    if scene_id not in store.scene_ids():
        raise InputError(f"{store_path}: no scene {scene_id!r}")
    return next(predict_scenes(loaded, as_path(store_path), bench, [scene_id], show_progress=False))
