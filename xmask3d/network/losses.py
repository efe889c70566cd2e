"""XMask3D training losses with the official weights (XMASK3D_SPEC.md §4-§5).

``compute_losses(outputs, batch, cfg, epoch)`` returns every term unweighted under its official
name plus ``total`` = Σ weight·term (``loss_weights(cfg, ...)`` gives the weights):

- Mask2Former set criterion on the 2D branch: ``loss_ce`` (eos_coef on the null class),
  ``loss_mask`` (BCE) and ``loss_dice`` on importance-sampled points, Hungarian matching, and the
  same three on every aux prediction (``loss_ce_0`` ...);
- ``loss_3d`` / ``loss_3d_pure``: CE over s·cos(feature, [base text; null]) on base labels;
- caption alignment ``loss_explicit_contra`` (fused), ``_3d`` (pure 3D), ``_2d_pre`` (2D, covered
  points only): 1 − cos(mean feature of the view's points, caption embedding);
- region captions (``caption_supervision`` "region" or "official+region", beyond the paper):
  ``loss_region_3d`` (pure 3D) and ``loss_region_fused``: a contrastive loss over every region
  caption of the batch — each caption's point set is pooled (PLA mean or RegionPLC score pooling)
  and must pick its own phrase among the batch's unique phrases (``region_caption_loss``);
- ``loss_binary``: BCE-with-logits (pos_weight) of the base-vs-novel head;
- ``loss_3d_contra``: mask-level regularisation of pure-3D features towards stop-grad MaskCLIP
  embeddings, from ``contra_start_epoch`` on.

Terms of a component switched off in ``ModelConfig`` (copied into ``LossConfig``:
``mask_regularization``, ``fusion``, ``binary_head``, ``caption_losses``) are absent from the result.

2D ground truth: views of scenes with ScanNet 2D label images (``batch["label_2d"]``, flagged by
``has_label_2d``) take their GT masks from the label image resized to the mask resolution with
nearest neighbour (``label_image_targets``), as the official loader does; views without (a scene
preprocessed without its ``_2d-label-filt.zip``, S3DIS) splat the base labels of the view's points
into a label image at the mask resolution (``build_2d_targets``); see docs/model.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from storage.benchmarks import get_benchmark
from xmask3d.network.matcher import HungarianMatcher, point_sample

IGNORE = 255
# LossConfig.caption_supervision values (ModelConfig.caption_supervision is copied into it)
CAPTION_SUPERVISION = ("official", "region", "official+region")


@dataclass
class LossConfig:
    """Loss weights and switches. Defaults = the official ScanNet20 B15N4 recipe (``paper``)."""

    # Mask2Former set criterion
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    eos_coef: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True
    # Q6: unlabelled/novel/ignored pixels form one GT segment of the null class (paper True).
    null_segment: bool = True
    # Splatted GT: empty pixels take the smallest label within this many pixels (our deviation).
    gt_fill_radius: int = 2
    # 3D CE on base labels
    loss_3d_weight: float = 4.0
    loss_3d_pure_weight: float = 4.0
    # Q11: the null column in the 3D CE (paper True) and the fake label when all are ignored.
    ce_null_column: bool = True
    ce_all_ignore_fallback: bool = True
    # caption alignment
    caption_fused_weight: float = 1.5
    caption_3d_weight: float = 1.0
    caption_2d_weight: float = 4.0
    # Which captions supervise: "official" = the view captions above (paper); "region" = region
    # captions (a phrase + the points of its box or index set, contrastive over the batch);
    # "official+region" = both. Region terms need a store with region captions.
    caption_supervision: Literal["official", "region", "official+region"] = "official"
    region_pooling: Literal["mean", "score"] = "score"  # PLA feature mean / RegionPLC score pooling
    # 4 = the weight of each 3D CE term; on synthetic-b15n4 (docs/openvocab.md) weight 1 left novel
    # classes at chance, 4 and 8 learned them equally well
    region_3d_weight: float = 4.0
    region_fused_weight: float = 4.0
    region_logit_scale: float = 1 / 0.07  # RegionPLC's (effectively fixed) initial scale, ≈ 14.3
    # RegionPLC NOVEL_GRAD_ONLY: base-labelled points pass no gradient from the region losses
    region_novel_grad_only: bool = True
    # phrases at least this cosine-close count as one ("a chair" / "the chair"; 1.0 = exact only)
    region_same_phrase_cos: float = 0.9
    # binary head (per benchmark)
    binary_weight: float = 16.0
    binary_pos_weight: float = 0.267
    # mask-level regularisation (per benchmark)
    contra_weight: float = 0.5
    contra_start_epoch: int = 50
    # Q5: "labels" selects masks with GT binary labels (paper); "scores" with the binary head.
    mask_selection: Literal["labels", "scores"] = "labels"
    contra_min_points: int = 10
    contra_top_novel: int = 4
    contra_top_base: int = 1
    contra_novel_ratio: float = 1.8
    contra_novel_min: int = 10
    contra_base_ratio: float = 20.0
    contra_base_min: int = 150
    # Component switches, copied from ModelConfig (set them there): a term of a switched-off
    # component is absent from compute_losses' result, not zero.
    mask_regularization: bool = True  # loss_3d_contra
    fusion: bool = True  # loss_3d and loss_explicit_contra (on the fused feature)
    binary_head: bool = True  # loss_binary
    caption_losses: bool = True  # loss_explicit_contra, _3d, _2d_pre

    def __post_init__(self) -> None:
        if self.caption_supervision not in CAPTION_SUPERVISION:
            raise ValueError(f"LossConfig.caption_supervision must be one of {list(CAPTION_SUPERVISION)}, "
                             f"got {self.caption_supervision!r}")
        if self.region_pooling not in ("mean", "score"):
            raise ValueError(
                f"LossConfig.region_pooling must be 'mean' or 'score', got {self.region_pooling!r}")
        if self.mask_selection not in ("labels", "scores"):
            raise ValueError(
                f"LossConfig.mask_selection must be 'labels' or 'scores', got {self.mask_selection!r}"
            )

    def with_benchmark(self, benchmark: Any) -> LossConfig:
        """The per-benchmark recipe (binary weight / pos_weight, contra weight / start epoch) applied.

        ``benchmark`` is a ``storage.benchmarks.Benchmark`` or its name.
        """
        if isinstance(benchmark, str):

            benchmark = get_benchmark(benchmark)
        return replace(
            self,
            binary_weight=benchmark.binary_weight,
            binary_pos_weight=benchmark.binary_pos_weight,
            contra_weight=benchmark.contra_weight,
            contra_start_epoch=benchmark.contra_start_epoch,
        )

    @property
    def view_captions(self) -> bool:
        """The official view-caption terms are on."""
        return self.caption_losses and "official" in self.caption_supervision

    @property
    def region_captions(self) -> bool:
        """The region-caption terms are on (the dataset must then carry region captions)."""
        return self.caption_losses and "region" in self.caption_supervision

    def contra_active(self, epoch: int) -> bool:
        return self.mask_regularization and self.contra_weight > 0 and epoch >= self.contra_start_epoch


# --------------------------------------------------------------------------- 2D ground truth


def build_2d_targets(
    label_base: torch.Tensor,
    uv: torch.Tensor,
    batch_index: torch.Tensor,
    batch_size: int,
    num_classes: int,
    image_size: tuple[int, int],
    mask_size: tuple[int, int],
    null_segment: bool = True,
    fill_radius: int = 2,
) -> list[dict[str, torch.Tensor]]:
    """Per-view GT masks from the points' base labels splatted at the mask resolution.

    label_base [N] (0..C−1, 255 ignore/novel), uv [N,2] (column, row) in an image of
    ``image_size`` (H, W); masks come out at ``mask_size`` (h, w). A pixel hit by several points
    takes the smallest label; empty pixels take the smallest label within ``fill_radius`` pixels;
    what stays empty, and every novel/ignored point, is the null class C. With ``null_segment``
    the null pixels form a GT mask of class C (official Q6), otherwise they are background only.
    -> per view {labels int64[M], masks float[M,h,w]}.
    """
    (height, width), (h, w) = image_size, mask_size
    empty = num_classes + 1
    col = (uv[:, 0].float() * (w / width)).long().clamp(0, w - 1)
    row = (uv[:, 1].float() * (h / height)).long().clamp(0, h - 1)
    labels = torch.where(label_base == IGNORE, torch.full_like(label_base, num_classes), label_base)
    flat = label_base.new_full((batch_size * h * w,), empty)
    flat = flat.scatter_reduce(0, batch_index * (h * w) + row * w + col, labels, "amin")
    image = flat.view(batch_size, 1, h, w)
    for _ in range(fill_radius):
        nearby = -F.max_pool2d(-image.float(), 3, stride=1, padding=1)
        image = torch.where(image == empty, nearby.long(), image)
    image = image[:, 0].masked_fill(image[:, 0] == empty, num_classes)
    return _segments(image, num_classes, null_segment)


def _segments(image: torch.Tensor, num_classes: int, null_segment: bool) -> list[dict[str, torch.Tensor]]:
    """Label images [B,h,w] (0..C, C = null) -> per view {labels (present, ascending), masks}."""
    present = image.new_zeros(image.shape[0], num_classes + 1, dtype=torch.bool)
    present.scatter_(1, image.flatten(1), True)
    if not null_segment:
        present[:, num_classes] = False
    # One host read for the batch: the number of GT segments of each view sets the matching's shapes.
    host = present.cpu().numpy()
    targets = []
    for b in range(image.shape[0]):
        labels = torch.from_numpy(np.flatnonzero(host[b])).to(image.device, non_blocking=True)
        targets.append({"labels": labels, "masks": (image[b][None] == labels[:, None, None]).float()})
    return targets


def label_image_targets(
    label_2d: torch.Tensor, num_classes: int, mask_size: tuple[int, int], null_segment: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Per-view GT masks from 2D label images: label_2d [B,H,W] base labels (0..C−1, 255 = novel,
    ignored or unannotated) resized to ``mask_size`` (h, w) with nearest neighbour (pixel centres);
    every non-base pixel is the null class C, a GT mask of class C with ``null_segment`` (Q6).
    -> per view {labels int64[M], masks float[M,h,w]}."""
    image = F.interpolate(label_2d[:, None].float(), size=tuple(mask_size), mode="nearest-exact")
    image = image[:, 0].long()
    image = image.masked_fill(image >= num_classes, num_classes)
    return _segments(image, num_classes, null_segment)


def view_targets(
    batch: dict[str, Any],
    batch_size: int,
    num_classes: int,
    image_size: tuple[int, int],
    mask_size: tuple[int, int],
    cfg: LossConfig,
    device: torch.device | str = "cpu",
) -> list[dict[str, torch.Tensor]]:
    """The 2D GT of every view of a batch: from its label image where ``has_label_2d``, else
    splatted from its points' base labels (``image_size`` (H, W) of ``uv``, masks at ``mask_size``)."""
    label_base = batch["label_base"].to(device).long()
    targets = build_2d_targets(
        label_base,
        batch["uv"].to(device),
        batch["batch_index"].to(device),
        batch_size,
        num_classes,
        image_size,
        mask_size,
        cfg.null_segment,
        cfg.gt_fill_radius,
    )
    if "label_2d" in batch and bool(batch["has_label_2d"].any()):
        dense = label_image_targets(batch["label_2d"].to(device), num_classes, mask_size, cfg.null_segment)
        use = batch["has_label_2d"].tolist()
        targets = [d if u else t for t, d, u in zip(targets, dense, use, strict=True)]
    return targets


# --------------------------------------------------------------------------- Mask2Former criterion


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Σ over masks of the mean BCE-with-logits over points, / num_masks. logits, targets [M,P]."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Σ over masks of 1 − (2|p·t| + 1)/(|p| + |t| + 1), / num_masks. logits, targets [M,P]."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def draw_sampling_points(
    m: int, num_points: int, oversample_ratio: float, importance_sample_ratio: float,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The random points of :func:`uncertain_points` for M masks: (candidates [M, P·oversample, 2],
    uniform rest [M, P − P·importance, 2] or None)."""
    candidates = torch.rand(m, int(num_points * oversample_ratio), 2, device=device)
    rest = num_points - int(importance_sample_ratio * num_points)
    return candidates, torch.rand(m, rest, 2, device=device) if rest > 0 else None


def uncertain_points(
    mask_logits: torch.Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float,
    draws: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """PointRend sampling: [M,1,h,w] -> [M,P,2]; a share from the most uncertain (−|logit|), rest uniform.
    ``draws`` = :func:`draw_sampling_points` output (None: drawn here)."""
    if draws is None:
        draws = draw_sampling_points(mask_logits.shape[0], num_points, oversample_ratio,
                                     importance_sample_ratio, mask_logits.device)
    coords, rest = draws
    uncertainty = -point_sample(mask_logits, coords)[:, 0].abs()
    num_uncertain = int(importance_sample_ratio * num_points)
    index = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = coords.gather(1, index[:, :, None].expand(-1, -1, 2))
    if rest is not None:
        chosen = torch.cat([chosen, rest], dim=1)
    return chosen


class SetCriterion:
    """Mask2Former SetCriterion: Hungarian matching, then CE / mask BCE / dice (+ deep supervision).

    Every layer is matched before any loss is computed, so the cost matrices of all layers and
    images reach the host in one copy (``HungarianMatcher.match_layers``). The random points are
    drawn in the order of a layer-by-layer loop (matching points per image, then the importance
    sampling), so the losses do not depend on that batching.
    """

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg
        self.matcher = HungarianMatcher(cfg.class_weight, cfg.mask_weight, cfg.dice_weight, cfg.num_points)

    def single(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        num_masks: float | torch.Tensor,
        indices: list[tuple[np.ndarray, np.ndarray]] | None = None,
        draws: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The three losses of one prediction layer: pred_logits [B,Q,C+1], pred_masks [B,Q,h,w];
        ``indices`` = its matching (``HungarianMatcher.match_layers``; None: matched here), ``draws``
        = its sampling points (None: drawn here)."""
        cfg = self.cfg
        if indices is None:
            points = [self.matcher.draw_points(pred_masks.device) if len(t["labels"]) else None
                      for t in targets]
            indices = self.matcher.match_layers([(pred_logits, pred_masks)], targets, [points])[0]
        device = pred_logits.device
        num_classes = pred_logits.shape[-1] - 1
        # matched (image, query, target row in the concatenated targets), built on the host
        first = np.cumsum([0] + [len(t["labels"]) for t in targets])
        pairs = [np.stack([np.full(len(q), b), q, j + first[b]]) for b, (q, j) in enumerate(indices)]
        pairs = np.concatenate(pairs + [np.zeros((3, 0), np.int64)], axis=1).astype(np.int64)
        batch_idx, query_idx, target_idx = torch.from_numpy(pairs).to(device, non_blocking=True)
        target_classes = torch.full(pred_logits.shape[:2], num_classes, dtype=torch.int64, device=device)
        target_classes[batch_idx, query_idx] = torch.cat([t["labels"] for t in targets])[target_idx]
        class_weight = torch.ones(num_classes + 1, dtype=torch.float32, device=device)
        class_weight[-1] = cfg.eos_coef
        loss_ce = F.cross_entropy(pred_logits.transpose(1, 2), target_classes, class_weight)
        if pairs.shape[1] == 0:
            zero = pred_masks.sum() * 0.0
            return {"loss_ce": loss_ce, "loss_mask": zero, "loss_dice": zero}
        src = pred_masks[batch_idx, query_idx][:, None]
        tgt = torch.cat([t["masks"] for t in targets])[target_idx][:, None]
        with torch.no_grad():
            coords = uncertain_points(src, cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio,
                                      draws)
            labels = point_sample(tgt, coords)[:, 0]
        logits = point_sample(src, coords)[:, 0]
        return {
            "loss_ce": loss_ce,
            "loss_mask": sigmoid_ce_loss(logits, labels, num_masks),
            "loss_dice": dice_loss(logits, labels, num_masks),
        }

    def __call__(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        aux: list[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        cfg, device = self.cfg, pred_logits.device
        sizes = [len(t["labels"]) for t in targets]
        num: float | torch.Tensor = max(float(sum(sizes)), 1.0)
        if dist.is_available() and dist.is_initialized():  # the mean over processes stays on the device
            total = torch.tensor(float(sum(sizes)), device=device)
            dist.all_reduce(total)
            num = (total / dist.get_world_size()).clamp(min=1.0)
        layers = [(pred_logits, pred_masks)]
        if cfg.deep_supervision:
            layers += [(a["pred_logits"], a["pred_masks"]) for a in aux or []]
        matched = sum(min(pred_logits.shape[1], m) for m in sizes)
        points, draws = [], []
        for _ in layers:
            points.append([self.matcher.draw_points(device) if m else None for m in sizes])
            draws.append(draw_sampling_points(matched, cfg.num_points, cfg.oversample_ratio,
                                              cfg.importance_sample_ratio, device) if matched else None)
        indices = self.matcher.match_layers(layers, targets, points)
        losses = self.single(pred_logits, pred_masks, targets, num, indices[0], draws[0])
        for i, (layer_logits, layer_masks) in enumerate(layers[1:]):
            for key, value in self.single(layer_logits, layer_masks, targets, num, indices[i + 1],
                                          draws[i + 1]).items():
                losses[f"{key}_{i}"] = value
        return losses


# --------------------------------------------------------------------------- 3D, captions, binary


def ce_3d(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int, all_ignore_fallback: bool
) -> torch.Tensor:
    """CE of point logits [N,C(+1)] against base labels [N] (255 = ignore).

    When every label is ignored: the official fake label C−1 on point 0 (Q11) with the fallback,
    else an exact 0 (still attached to the graph).
    """
    if len(labels) == 0:
        return logits.sum() * 0.0
    valid = labels != IGNORE
    if all_ignore_fallback:  # tensor ops, no host read: point 0 takes C−1 when every label is ignored
        first = torch.arange(len(labels), device=labels.device) == 0
        labels = torch.where(first & ~valid.any(), num_classes - 1, labels)
        valid = valid | (first & ~valid.any())
    # the mean over the valid points; exact 0 when there are none
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return total / valid.sum().clamp(min=1)


def caption_loss(
    feats: torch.Tensor,
    batch_index: torch.Tensor,
    captions: torch.Tensor,
    has_caption: torch.Tensor,
    select: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean over views with a caption (and ≥ 1 selected point) of 1 − cos(mean point feature, caption)."""
    b = captions.shape[0]
    weight = torch.ones_like(batch_index, dtype=feats.dtype) if select is None else select.to(feats.dtype)
    total = feats.new_zeros(b, feats.shape[1]).index_add(0, batch_index, feats * weight[:, None])
    count = feats.new_zeros(b).index_add(0, batch_index, weight)
    valid = has_caption & (count > 0)
    mean = total / count.clamp(min=1e-12)[:, None]  # views without points: 0 / tiny, masked below
    terms = (1 - F.cosine_similarity(mean, captions, dim=-1)) * valid
    return terms.sum() / valid.sum().clamp(min=1)  # exact 0 without a valid view


def region_caption_loss(
    feats: torch.Tensor,
    region_point: torch.Tensor,
    region_index: torch.Tensor,
    region_clip: torch.Tensor,
    scale: float,
    pooling: str = "score",
    grad_mask: torch.Tensor | None = None,
    same_phrase_cos: float = 1.0,
) -> torch.Tensor:
    """Contrastive loss of region captions over the batch (CAPTION_SUPERVISION_SPEC.md §3.4).

    feats [N,D] point features; region r covers the points ``region_point[m]`` with
    ``region_index[m] == r``; region_clip [R,D] its phrase embedding. Phrases are de-duplicated
    (identical embeddings are one class; with ``same_phrase_cos`` < 1, phrases at least that close,
    such as "a chair" / "the chair", all count as the region's own, so near-identical wordings are
    not each other's negatives) and every region must pick its own among them:
    - "mean" (PLA): CE over s·cos(mean feature of the region, phrase_k);
    - "score" (RegionPLC): −mean over the region's points of log_softmax_k(s·cos(f_i, phrase_k))
      at its own phrase, regions weighted by their point counts.
    ``grad_mask`` [N] bool: points that receive gradient (others enter the forward detached).
    Points in no region receive no gradient. Exact 0 (attached) without regions.
    """
    if len(region_clip) == 0 or len(region_point) == 0:
        return feats.sum() * 0.0
    phrases, label = torch.unique(F.normalize(region_clip.float(), dim=-1), dim=0, return_inverse=True)
    # [R,K]: the phrases that count as the region's own (itself, and near-identical wordings)
    positive = (phrases[label] @ phrases.T >= same_phrase_cos) | F.one_hot(label, len(phrases)).bool()
    member = feats[region_point]
    if grad_mask is not None:
        keep = grad_mask[region_point, None]
        member = torch.where(keep, member, member.detach())
    member = member.float()
    if pooling == "mean":
        num = len(region_clip)
        total = member.new_zeros(num, member.shape[1]).index_add(0, region_index, member)
        count = torch.bincount(region_index, minlength=num)
        valid = count > 0
        pooled = F.normalize(total[valid] / count[valid, None].to(total), dim=-1)
        log_prob = F.log_softmax(scale * pooled @ phrases.T, dim=-1)
        return -_log_positive(log_prob, positive[valid]).mean()
    log_prob = F.log_softmax(scale * F.normalize(member, dim=-1) @ phrases.T, dim=-1)
    return -_log_positive(log_prob, positive[region_index]).mean()


def _log_positive(log_prob: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """log of the probability mass on the positive phrases, per row: [M,K], [M,K] bool -> [M]."""
    return torch.logsumexp(log_prob.masked_fill(~positive, float("-inf")), dim=-1)


def binary_loss(logits: torch.Tensor, binary: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """BCE-with-logits (pos_weight) of the base (1) vs novel (0) head; 255 = ignored."""
    valid = binary != IGNORE
    weight = logits.new_full((), pos_weight, dtype=torch.float32)
    target = torch.where(valid, binary, 0)
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight, reduction="none")
    return (loss * valid).sum() / valid.sum().clamp(min=1)  # mean over the valid points, 0 without


# --------------------------------------------------------------------------- mask regularisation


def mask_confidence(mask_probs: torch.Tensor) -> torch.Tensor:
    """Mean probability over the pixels where it is > 0.5, per query: [B,Q,H,W] -> [B,Q] (0 if none)."""
    inside = (mask_probs > 0.5).to(mask_probs.dtype)
    return (mask_probs * inside).flatten(2).sum(-1) / inside.flatten(2).sum(-1).clamp(min=1)


def select_masks(
    inside: torch.Tensor, binary: torch.Tensor, confidence: torch.Tensor, cfg: LossConfig
) -> torch.Tensor:
    """The masks of one view chosen for the regularisation: bool [Q].

    inside [n,Q] bool (point in raw query mask), binary [n] (1 base, 0 novel, 255 ignore: GT labels
    in "labels" mode, predicted 0/1 in "scores" mode), confidence [Q]. A mask needs
    ≥ ``contra_min_points`` points; it is novel if #novel > 1.8·#other and #novel > 10, else base if
    #base > 20·#other and #base > 150 (ignored points count as "other"); the top 4 novel and the
    top 1 base masks by confidence are kept (ties: the lower query id). Tensor ops only.
    """
    count = inside.sum(0)
    n_novel = (inside & (binary == 0)[:, None]).sum(0)
    n_base = (inside & (binary == 1)[:, None]).sum(0)
    valid = count >= cfg.contra_min_points
    novel = valid & (n_novel > cfg.contra_novel_ratio * (count - n_novel)) & (n_novel > cfg.contra_novel_min)
    base = (
        valid & ~novel & (n_base > cfg.contra_base_ratio * (count - n_base)) & (n_base > cfg.contra_base_min)
    )
    # ahead[q, r]: query r comes before q in a stable sort by descending confidence
    ids = torch.arange(len(confidence), device=confidence.device)
    ahead = (confidence[None, :] > confidence[:, None]) | (
        (confidence[None, :] == confidence[:, None]) & (ids[None, :] < ids[:, None]))
    chosen = torch.zeros_like(novel)
    for flags, top in ((novel, cfg.contra_top_novel), (base, cfg.contra_top_base)):
        chosen |= flags & ((ahead & flags[None, :]).sum(1) < top)
    return chosen


def mask_regularisation(
    point_probs: torch.Tensor,
    confidence: torch.Tensor,
    feats_3d: torch.Tensor,
    mask_clip: torch.Tensor,
    view_sizes: Sequence[int],
    binary: torch.Tensor,
    cfg: LossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean over selected masks of 1 − cos(mean pure-3D feature in the mask, stop-grad MaskCLIP embed).

    point_probs [N,Q] raw query mask probabilities at the points, confidence [B,Q], feats_3d [N,D],
    mask_clip [B,Q,D], view_sizes = points per view (the views' points are consecutive, as collated;
    host integers), binary [N]: GT binary labels ("labels") or the binary-head probability
    ("scores", thresholded at 0.5). -> (loss, number of selected masks, a tensor); exact 0 when
    none. Every mask's mean feature is computed and the selection weights them, so nothing is read
    on the host.
    """
    if cfg.mask_selection == "scores":
        binary = (binary.detach() > 0.5).long()
    inside_all = point_probs.detach() >= 0.5
    total = feats_3d.sum() * 0.0
    count = torch.zeros((), dtype=torch.int64, device=feats_3d.device)
    start = 0
    for b, size in enumerate(view_sizes):
        pts = slice(start, start + size)
        start += size
        if size == 0:
            continue
        inside = inside_all[pts]
        chosen = select_masks(inside, binary[pts], confidence[b].detach(), cfg)  # [Q]
        weights = inside.to(feats_3d.dtype)  # [n, Q]
        mean = (weights.T @ feats_3d[pts]) / weights.sum(0).clamp(min=1)[:, None]
        total = total + ((1 - F.cosine_similarity(mean, mask_clip[b].detach(), dim=-1)) * chosen).sum()
        count = count + chosen.sum()
    return total / count.clamp(min=1), count


def view_sizes(batch: dict[str, Any], batch_size: int) -> list[int]:
    """Points per view from the batch's host-side ``offset`` (cumulative counts; one host read of
    a host tensor, no device synchronisation), else from ``batch_index`` (a device read)."""
    if "offset" in batch:
        ends = [int(x) for x in torch.as_tensor(batch["offset"]).tolist()]
    else:
        ends = torch.bincount(batch["batch_index"], minlength=batch_size).cumsum(0).tolist()
    return [e - s for s, e in zip([0, *ends[:-1]], ends, strict=True)]


# --------------------------------------------------------------------------- all terms


def loss_weights(cfg: LossConfig, aux_layers: int = 0) -> dict[str, float]:
    """Weight of every loss term by name (aux layers included)."""
    weights = {"loss_ce": cfg.class_weight, "loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight}
    if cfg.deep_supervision:
        for i in range(aux_layers):
            weights.update(
                {
                    f"loss_ce_{i}": cfg.class_weight,
                    f"loss_mask_{i}": cfg.mask_weight,
                    f"loss_dice_{i}": cfg.dice_weight,
                }
            )
    if cfg.fusion:
        weights["loss_3d"] = cfg.loss_3d_weight
    weights["loss_3d_pure"] = cfg.loss_3d_pure_weight
    if cfg.region_captions:
        weights["loss_region_3d"] = cfg.region_3d_weight
        if cfg.fusion:
            weights["loss_region_fused"] = cfg.region_fused_weight
    if cfg.view_captions:
        if cfg.fusion:
            weights["loss_explicit_contra"] = cfg.caption_fused_weight
        weights["loss_explicit_contra_3d"] = cfg.caption_3d_weight
        weights["loss_explicit_contra_2d_pre"] = cfg.caption_2d_weight
    if cfg.binary_head:
        weights["loss_binary"] = cfg.binary_weight
    if cfg.mask_regularization:
        weights["loss_3d_contra"] = cfg.contra_weight
    return weights


def _regularisation_term(
    outputs: dict[str, Any], sizes: Sequence[int], binary: torch.Tensor, cfg: LossConfig, epoch: int
) -> torch.Tensor:
    """loss_3d_contra; exactly 0 before ``contra_start_epoch`` (official)."""
    if not cfg.contra_active(epoch):
        return outputs["feats_3d"].sum() * 0.0
    if outputs.get("mask_clip") is None:
        raise ValueError(
            f"loss_3d_contra is active at epoch {epoch} but the forward computed no MaskCLIP embeddings: "
            "build the model with the same LossConfig as compute_losses"
        )
    selection = binary if cfg.mask_selection == "labels" else outputs["binary_logit"].sigmoid()
    loss, _ = mask_regularisation(
        outputs["point_probs"],
        outputs["mask_confidence"],
        outputs["feats_3d"],
        outputs["mask_clip"],
        sizes,
        selection,
        cfg,
    )
    return loss


def compute_losses(
    outputs: dict[str, Any], batch: dict[str, Any], cfg: LossConfig, epoch: int = 0
) -> dict[str, torch.Tensor]:
    """Every loss term (unweighted, official names) and ``total`` = Σ weight·term.

    ``outputs`` is ``XMask3D.forward``'s dict (float32: the model casts its outputs); ``batch`` the
    collate output on the same device (label_base, binary, uv, batch_index, caption, has_caption;
    label_2d when collated from a store; ``offset`` and ``has_label_2d`` on the host). The losses run
    in float32 with autocast off (as Mask2Former's criterion).
    """
    with torch.autocast(outputs["pred_logits"].device.type, enabled=False):
        return _compute_losses(outputs, batch, cfg, epoch)


def _compute_losses(outputs: dict[str, Any], batch: dict[str, Any], cfg: LossConfig, epoch: int
                    ) -> dict[str, torch.Tensor]:
    pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
    batch_size, num_classes = pred_logits.shape[0], pred_logits.shape[-1] - 1
    # the batch is on the device in its final dtypes (xmask3d.engine.train.train_step)
    batch_index, label_base = batch["batch_index"], batch["label_base"]
    image_size, mask_size = tuple(outputs["image_size"]), tuple(pred_masks.shape[-2:])
    targets = view_targets(batch, batch_size, num_classes, image_size, mask_size, cfg, pred_logits.device)
    losses = SetCriterion(cfg)(pred_logits, pred_masks, targets, outputs.get("aux"))
    if cfg.fusion:
        losses["loss_3d"] = ce_3d(
            outputs["logits_3d_fused"], label_base, num_classes, cfg.ce_all_ignore_fallback
        )
    losses["loss_3d_pure"] = ce_3d(
        outputs["logits_3d_pure"], label_base, num_classes, cfg.ce_all_ignore_fallback
    )
    if cfg.region_captions:
        if "region_clip" not in batch:
            raise ValueError("region caption losses are on but the batch has no region captions: "
                             "build the dataset with regions=True")
        region = (batch["region_point"], batch["region_index"], batch["region_clip"])
        grad_mask = (batch["binary"] != 1) if cfg.region_novel_grad_only else None
        losses["loss_region_3d"] = region_caption_loss(
            outputs["feats_3d"], *region, cfg.region_logit_scale, cfg.region_pooling, grad_mask,
            cfg.region_same_phrase_cos)
        if cfg.fusion:
            losses["loss_region_fused"] = region_caption_loss(
                outputs["feats_fused"], *region, cfg.region_logit_scale, cfg.region_pooling, grad_mask,
                cfg.region_same_phrase_cos)
    if cfg.view_captions:
        caption, has_caption = batch["caption"], batch["has_caption"]
        if cfg.fusion:
            losses["loss_explicit_contra"] = caption_loss(
                outputs["feats_fused"], batch_index, caption, has_caption
            )
        losses["loss_explicit_contra_3d"] = caption_loss(
            outputs["feats_3d"], batch_index, caption, has_caption
        )
        losses["loss_explicit_contra_2d_pre"] = caption_loss(
            outputs["feats_2d"], batch_index, caption, has_caption, select=outputs["covered"]
        )
    binary = batch["binary"]
    if cfg.binary_head:
        if outputs.get("binary_logit") is None:
            raise ValueError("loss_binary is on but the forward has no binary head: build the model "
                             "with the same LossConfig as compute_losses")
        losses["loss_binary"] = binary_loss(outputs["binary_logit"], binary, cfg.binary_pos_weight)
    if cfg.mask_regularization:
        sizes = view_sizes(batch, batch_size) if cfg.contra_active(epoch) else []
        losses["loss_3d_contra"] = _regularisation_term(outputs, sizes, binary, cfg, epoch)
    weights = loss_weights(cfg, len(outputs.get("aux") or []))
    factors = torch.tensor([weights[k] for k in losses], dtype=torch.float32)
    losses["total"] = torch.stack(list(losses.values())) @ factors.to(pred_logits.device, non_blocking=True)
    return losses
