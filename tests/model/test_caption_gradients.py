"""Gradients of the caption losses match finite differences (a detached term fails here).

``caption_loss`` (the official view-caption alignment) runs in the input's dtype, so torch's
``gradcheck`` applies in float64; ``region_caption_loss`` computes in float32, so its gradient is
compared with central differences at a float32 tolerance.
"""

from __future__ import annotations

import pytest
import torch

from xmask3d.network.losses import caption_loss, region_caption_loss


def test_caption_loss_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    batch_index = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    captions = torch.randn(3, 4, generator=g, dtype=torch.float64)
    has_caption = torch.tensor([True, True, False])
    select = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.float64)

    assert torch.autograd.gradcheck(lambda f: caption_loss(f, batch_index, captions, has_caption), (feats,))
    assert torch.autograd.gradcheck(lambda f: caption_loss(f, batch_index, captions, has_caption, select),
                                    (feats,))
    (grad,) = torch.autograd.grad(caption_loss(feats, batch_index, captions, has_caption, select), feats)
    assert grad[[0, 1, 3, 5]].abs().sum(1).gt(0).all()  # selected points of captioned views are pulled
    assert torch.equal(grad[[2, 4, 6, 7, 8]], torch.zeros(5, 4, dtype=torch.float64))  # the rest: none


def _central_differences(fn, x: torch.Tensor, eps: float) -> torch.Tensor:
    grad = torch.zeros_like(x)
    flat, out = x.detach().clone().view(-1), grad.view(-1)
    for i in range(flat.numel()):
        keep = float(flat[i])
        flat[i] = keep + eps
        plus = float(fn(flat.view_as(x)))
        flat[i] = keep - eps
        minus = float(fn(flat.view_as(x)))
        flat[i] = keep
        out[i] = (plus - minus) / (2 * eps)
    return grad


@pytest.mark.parametrize("pooling", ["mean", "score"])
def test_region_caption_loss_gradient_matches_finite_differences(pooling):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    point = torch.tensor([0, 1, 2, 2, 3, 4])  # point 2 in two regions; points 5, 6 in none
    index = torch.tensor([0, 0, 0, 1, 1, 2])
    clip = torch.randn(3, 4, generator=g)

    def loss(f):
        return region_caption_loss(f, point, index, clip, scale=5.0, pooling=pooling)

    (grad,) = torch.autograd.grad(loss(feats), feats)
    expected = _central_differences(loss, feats, eps=1e-3)
    assert grad.abs().max() > 1e-2  # a real gradient, not an attached zero
    torch.testing.assert_close(grad, expected, rtol=0, atol=2e-3)
