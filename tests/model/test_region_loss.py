"""Region-caption losses: gradient only inside a caption's region, hand-computed values, duplicates."""

import math

import pytest
import torch
import torch.nn.functional as F

from xmask3d.network.losses import LossConfig, loss_weights, region_caption_loss


def two_regions():
    """6 points; region 0 = points {0, 1}, region 1 = points {1, 2, 3}; points 4, 5 in no region."""
    point = torch.tensor([0, 1, 1, 2, 3])
    index = torch.tensor([0, 0, 1, 1, 1])
    clip = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    return point, index, clip


@pytest.mark.parametrize("pooling", ["mean", "score"])
def test_gradient_reaches_region_points_only(pooling):
    point, index, clip = two_regions()
    feats = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = region_caption_loss(feats, point, index, clip, scale=10.0, pooling=pooling)
    (grad,) = torch.autograd.grad(loss, feats)
    assert grad[:4].abs().sum(1).gt(0).all()  # every point of a region is pulled
    assert torch.equal(grad[4:], torch.zeros(2, 3))  # points outside every region: exactly none


@pytest.mark.parametrize("pooling", ["mean", "score"])
def test_grad_mask_stops_base_points(pooling):
    point, index, clip = two_regions()
    feats = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    keep = torch.tensor([True, False, True, True, True, True])  # point 1 is base-labelled
    loss = region_caption_loss(feats, point, index, clip, 10.0, pooling, grad_mask=keep)
    (grad,) = torch.autograd.grad(loss, feats)
    assert torch.equal(grad[1], torch.zeros(3))
    assert grad[[0, 2, 3]].abs().sum(1).gt(0).all()


def test_mean_pooling_value_by_hand():
    point, index, clip = two_regions()
    feats = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [5.0, 5, 5], [1.0, 2, 3]])
    # region 0 mean = (1,0,0): cos 1 with its phrase, 0 with the other
    # region 1 mean = (1/3, 2/3, 0) -> unit (1, 2, 0)/sqrt(5):
    # cos 1/sqrt5 with phrase 0, 2/sqrt5 with phrase 1
    s = 10.0
    ce0 = -math.log(math.exp(s) / (math.exp(s) + 1.0))
    a, b = s / math.sqrt(5), 2 * s / math.sqrt(5)
    ce1 = -math.log(math.exp(b) / (math.exp(a) + math.exp(b)))
    loss = region_caption_loss(feats, point, index, clip, s, "mean")
    assert float(loss) == pytest.approx((ce0 + ce1) / 2, rel=1e-5)


def test_score_pooling_value_by_hand():
    point, index, clip = two_regions()
    feats = torch.tensor([[1.0, 0, 0], [1.0, 1, 0], [0, 1.0, 0], [0, 1.0, 0], [5.0, 5, 5], [1.0, 2, 3]])
    s = 10.0

    def nll(f, k):
        f = F.normalize(torch.tensor(f), dim=0)
        logits = s * torch.stack([f[0], f[1]])
        return -float(torch.log_softmax(logits, 0)[k])

    # point-count weighted: region 0 has 2 points, region 1 has 3 -> mean over the 5 memberships
    expected = (nll([1.0, 0, 0], 0) + nll([1.0, 1, 0], 0) + nll([1.0, 1, 0], 1) + nll([0, 1.0, 0], 1)
                + nll([0, 1.0, 0], 1)) / 5
    loss = region_caption_loss(feats, point, index, clip, s, "score")
    assert float(loss) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "score"])
def test_identical_phrases_are_one_class(pooling):
    """Two regions named by the same phrase are not each other's negatives: one class, loss 0."""
    point, index, _ = two_regions()
    clip = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 2.0]])
    feats = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    loss = region_caption_loss(feats, point, index, clip, 10.0, pooling)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_no_regions_is_an_attached_zero():
    feats = torch.randn(4, 3, requires_grad=True)
    loss = region_caption_loss(feats, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                               torch.zeros(0, 3), 10.0, "score")
    assert loss.item() == 0.0 and loss.requires_grad


def test_caption_supervision_selects_the_terms():
    official = loss_weights(LossConfig())
    region = loss_weights(LossConfig(caption_supervision="region"))
    both = loss_weights(LossConfig(caption_supervision="official+region"))
    off = loss_weights(LossConfig(caption_supervision="region", caption_losses=False))
    assert "loss_region_3d" not in official and "loss_explicit_contra_3d" in official
    assert {"loss_region_3d", "loss_region_fused"} <= set(region) and "loss_explicit_contra_3d" not in region
    assert {"loss_region_3d", "loss_explicit_contra_3d"} <= set(both)
    assert not {"loss_region_3d", "loss_explicit_contra_3d"} & set(off)
    with pytest.raises(ValueError, match="caption_supervision"):
        LossConfig(caption_supervision="entity")
