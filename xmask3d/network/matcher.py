"""Mask2Former Hungarian matcher: point-sampled mask costs + class cost, solved with scipy.

cost = w_class·(−p_cls[target]) + w_mask·BCE + w_dice·dice, with BCE and dice evaluated on
``num_points`` uniformly random points shared by every prediction and target of an image
(``point_sample`` = ``grid_sample`` with align_corners False), as in Mask2Former's matcher.py.
"""

from __future__ import annotations

import numpy as np
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

    def draw_points(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The random points [1, P, 2] one image's costs are evaluated at."""
        return torch.rand(1, self.num_points, 2, device=device)

    def cost_matrix(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor,
        coords: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cost [Q,M] for one image: pred_logits [Q,K+1], pred_masks [Q,h,w], labels [M], masks [M,H,W]
        (float32); ``coords`` [1,P,2] = the sample points (None: drawn here)."""
        prob = pred_logits.softmax(-1)
        cost_class = -prob[:, labels]
        if coords is None:
            coords = self.draw_points(pred_masks.device)
        out = point_sample(pred_masks[:, None], coords.expand(len(pred_masks), -1, -1))[:, 0]
        tgt = point_sample(masks[:, None], coords.expand(len(masks), -1, -1))[:, 0]
        return (
            self.cost_mask * pairwise_sigmoid_ce(out, tgt)
            + self.cost_class * cost_class
            + self.cost_dice * pairwise_dice(out, tgt)
        )

    @torch.no_grad()
    def match_layers(
        self,
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        targets: list[dict[str, torch.Tensor]],
        points: list[list[torch.Tensor | None]],
    ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Match every prediction layer (pred_logits [B,Q,K+1], pred_masks [B,Q,h,w]) to the targets;
        ``points[layer][image]`` = that image's sample points (None for an image without targets).

        -> per layer, per image (query indices, target indices), int64 numpy arrays, sorted by query.
        Every cost matrix is computed first and all of them cross to the host in one copy: the
        assignment (scipy's linear_sum_assignment) is a host algorithm, so this copy is the one
        host synchronisation the matching needs, whatever the number of layers and images.
        """
        costs, shapes = [], []
        for (pred_logits, pred_masks), layer_points in zip(layers, points, strict=True):
            for b, (target, coords) in enumerate(zip(targets, layer_points, strict=True)):
                if len(target["labels"]) == 0:
                    continue
                cost = self.cost_matrix(pred_logits[b], pred_masks[b], target["labels"], target["masks"],
                                        coords)
                costs.append(cost.reshape(-1))
                shapes.append(tuple(cost.shape))
        host = torch.cat(costs).cpu().numpy() if costs else None
        empty = np.zeros(0, dtype=np.int64)
        result, start, k = [], 0, 0
        for _ in layers:
            layer = []
            for target in targets:
                if len(target["labels"]) == 0:
                    layer.append((empty, empty))
                    continue
                q, m = shapes[k]
                rows, cols = linear_sum_assignment(host[start:start + q * m].reshape(q, m))
                start, k = start + q * m, k + 1
                layer.append((rows.astype(np.int64), cols.astype(np.int64)))
            result.append(layer)
        return result

    @torch.no_grad()
    def __call__(
        self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """pred_logits [B,Q,K+1], pred_masks [B,Q,h,w], targets[b] = {labels [M], masks [M,H,W]}
        -> per image (query indices, target indices), int64, sorted by query."""
        points = [self.draw_points(pred_masks.device) if len(t["labels"]) else None for t in targets]
        matched = self.match_layers([(pred_logits, pred_masks)], targets, [points])[0]
        return [(torch.from_numpy(rows), torch.from_numpy(cols)) for rows, cols in matched]
