"""Mask2Former Hungarian matcher: point-sampled mask costs + class cost, solved with scipy.

cost = w_class·(−p_cls[target]) + w_mask·BCE + w_dice·dice, with BCE and dice evaluated on
``num_points`` uniformly random points shared by every prediction and target of an image
(``point_sample`` = ``grid_sample`` with align_corners False), as in Mask2Former's matcher.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def point_sample(values: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of maps [M,C,H,W] at normalised points [M,P,2] in [0,1]² (x, y) -> [M,C,P]."""
    out = F.grid_sample(values, 2.0 * coords[:, :, None, :] - 1.0, align_corners=False)
    return out[:, :, :, 0]


def pairwise_sigmoid_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits between every prediction [Q,P] and every target [M,P] -> [Q,M]."""
    points = logits.shape[1]
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / points


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss 1 − (2|p∩t| + 1)/(|p| + |t| + 1) between every prediction [Q,P] and target [M,P]."""
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher:
    """One-to-one assignment of queries to GT masks per image (Mask2Former)."""

    def __init__(
        self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544
    ):
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    def cost_matrix(
        self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        """Cost [Q,M] for one image: pred_logits [Q,K+1], pred_masks [Q,h,w], labels [M], masks [M,H,W]."""
        prob = pred_logits.float().softmax(-1)
        cost_class = -prob[:, labels]
        coords = torch.rand(1, self.num_points, 2, device=pred_masks.device)
        out = point_sample(pred_masks[:, None].float(), coords.expand(len(pred_masks), -1, -1))[:, 0]
        tgt = point_sample(masks[:, None].float(), coords.expand(len(masks), -1, -1))[:, 0]
        return (
            self.cost_mask * pairwise_sigmoid_ce(out, tgt)
            + self.cost_class * cost_class
            + self.cost_dice * pairwise_dice(out, tgt)
        )

    @torch.no_grad()
    def __call__(
        self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """pred_logits [B,Q,K+1], pred_masks [B,Q,h,w], targets[b] = {labels [M], masks [M,H,W]}
        -> per image (query indices, target indices), int64, sorted by query."""
        result = []
        for b, target in enumerate(targets):
            if len(target["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                result.append((empty, empty))
                continue
            cost = self.cost_matrix(pred_logits[b], pred_masks[b], target["labels"], target["masks"])
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            result.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return result
