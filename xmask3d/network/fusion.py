"""2D→3D: final 2D masks, their lookup at the points of a view, and the 2D/3D feature merger.

XMASK3D_SPEC.md §4. Per view the mask logits are upsampled bilinearly to the view size
(240×320 for a 320×240 image); each pixel goes to the query with the largest
score·sigmoid(mask), and the final mask k = (argmax == k) ∧ sigmoid_k ≥ 0.5, so final masks are
disjoint. A point takes the mask of its pixel (uv = column, row); its 2D feature is the
embedding of that mask (the mean over covering masks of the official code is over at most one
mask). ``FeatureMerger`` maps cat(2D, 3D) → D for covered points; uncovered points keep their
3D feature.

Unlike the official code, a view whose points no mask covers is left uncovered (the official
code forces mask 0 onto point 0 to avoid empty tensors); the losses handle empty sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATED = -1e10  # the value the official eval gating writes into blocked logit columns


def query_scores(pred_logits: torch.Tensor) -> torch.Tensor:
    """Confidence of each query = max softmax over its class logits (null included): [B,Q,K] -> [B,Q]."""
    return pred_logits.detach().softmax(-1).max(-1).values


def upsample_masks(pred_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask logits [B,Q,h,w] -> probabilities [B,Q,H,W] (bilinear, align_corners False, then sigmoid)."""
    up = F.interpolate(pred_masks, size=size, mode="bilinear", align_corners=False)
    return up.sigmoid()


def assign_pixels(
    mask_probs: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Disjoint final masks: per pixel the query with the largest score·prob, if its prob ≥ 0.5.

    mask_probs [B,Q,H,W], scores [B,Q], keep [B,Q] bool (queries allowed to win; None = all)
    -> query id per pixel [B,H,W] int64, -1 where no final mask covers the pixel.
    """
    weighted = scores[:, :, None, None] * mask_probs
    if keep is not None:
        weighted = torch.where(keep[:, :, None, None], weighted, torch.full_like(weighted, -1.0))
    best = weighted.argmax(1)
    best_prob = mask_probs.gather(1, best[:, None])[:, 0]
    covered = best_prob >= 0.5
    if keep is not None:
        covered &= keep.gather(1, best.flatten(1)).view_as(best)
    return torch.where(covered, best, torch.full_like(best, -1))


def lookup_points(pixel_map: torch.Tensor, uv: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
    """Value of a per-view map [B,H,W,...] at each point's pixel; uv = (column, row) -> [N,...]."""
    return pixel_map[batch_index, uv[:, 1], uv[:, 0]]


def point_query_probs(mask_probs: torch.Tensor, uv: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
    """Probability of every query of the point's view at the point's pixel: [B,Q,H,W] -> [N,Q]."""
    return mask_probs[batch_index, :, uv[:, 1], uv[:, 0]]


def point_mask_features(
    point_mask: torch.Tensor, mask_embed: torch.Tensor, batch_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point 2D feature = embedding of the final mask covering it (zeros when uncovered).

    point_mask [N] query id (-1 none), mask_embed [B,Q,D] -> (feats_2d [N,D], covered [N] bool).
    """
    covered = point_mask >= 0
    feats = mask_embed[batch_index, point_mask.clamp(min=0)]
    feats = torch.where(covered[:, None], feats, torch.zeros_like(feats))
    return feats, covered


def query_binary_mean(
    point_probs: torch.Tensor, binary_prob: torch.Tensor, batch_index: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean binary-head probability over the points each raw query mask (prob > 0.5) covers.

    point_probs [N,Q], binary_prob [N], batch_index [N] -> (mean [B,Q] (0 where empty),
    count [B,Q] of covered points). Used by the eval gating (spec §4 step 3).
    """
    inside = (point_probs > 0.5).to(binary_prob.dtype)  # [N,Q]
    q = point_probs.shape[1]
    total = binary_prob.new_zeros(batch_size, q).index_add_(0, batch_index, inside * binary_prob[:, None])
    count = binary_prob.new_zeros(batch_size, q).index_add_(0, batch_index, inside)
    return total / count.clamp(min=1), count


def gate_query_logits(
    logits: torch.Tensor, mask_binary: torch.Tensor, is_base: torch.Tensor, thresh: float = 0.5
) -> torch.Tensor:
    """Eval gating of query logits [B,Q,T+1] (last column = null) by the mask's mean binary prob.

    b̄ > thresh: the query is base, novel columns get -1e10; otherwise base columns and the null
    column get -1e10 (official eval, spec §4 step 3 / Q16).
    """
    t = is_base.numel()
    if logits.shape[-1] != t + 1:
        raise ValueError(f"gate_query_logits expects T+1={t + 1} columns (null last), got {logits.shape[-1]}")
    base_query = (mask_binary > thresh)[..., None]
    block_base = torch.cat([is_base, is_base.new_ones(1)]).to(logits.device)  # base + null
    block_novel = torch.cat([~is_base, is_base.new_zeros(1)]).to(logits.device)
    blocked = torch.where(base_query, block_novel, block_base)
    return logits.masked_fill(blocked, GATED)


class FeatureMerger(nn.Module):
    """Linear(cat(2D, 3D) → D) for covered points; uncovered points keep the 3D feature.

    The map runs on the covered points only; finding them (``nonzero``) is one host
    synchronisation, kept on purpose: computing the map on every point and selecting (no
    synchronisation) made the CPU step about 12 % slower where few points are covered
    (docs/benchmarks.md, training step)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(2 * dim, dim)

    def forward(self, feats_3d: torch.Tensor, feats_2d: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
        index = covered.nonzero()[:, 0]
        merged = self.linear(torch.cat([feats_2d[index], feats_3d[index]], dim=1))
        return feats_3d.index_put((index,), merged)
