"""2D→3D: disjoint final masks, point lookup, 2D features, merger, eval gating."""

import torch

from xmask3d.network.fusion import (
    GATED,
    FeatureMerger,
    assign_pixels,
    gate_query_logits,
    lookup_points,
    point_mask_features,
    point_query_probs,
    query_binary_mean,
    query_scores,
    upsample_masks,
)


def two_query_probs() -> torch.Tensor:
    """[1,2,2,4]: query 0 strong on the left half, query 1 medium everywhere, weak at (1,3)."""
    probs = torch.full((1, 2, 2, 4), 0.1)
    probs[0, 0, :, :2] = 0.9
    probs[0, 1] = 0.8
    probs[0, 1, 1, 3] = 0.3
    return probs


def test_assign_pixels_weights_by_score_and_thresholds_the_winner():
    probs = two_query_probs()
    # query 1 has the larger score: it wins where its prob*score beats query 0's
    got = assign_pixels(probs, torch.tensor([[0.5, 1.0]]))
    assert got.tolist() == [[[1, 1, 1, 1], [1, 1, 1, -1]]]  # (1,3): winner prob 0.3 < 0.5 -> none
    got = assign_pixels(probs, torch.tensor([[1.0, 0.5]]))
    assert got.tolist() == [[[0, 0, 1, 1], [0, 0, 1, -1]]]


def test_assign_pixels_respects_dropped_queries():
    probs = two_query_probs()
    keep = torch.tensor([[False, True]])
    got = assign_pixels(probs, torch.tensor([[1.0, 0.1]]), keep)
    assert got.tolist() == [[[1, 1, 1, 1], [1, 1, 1, -1]]]
    none = assign_pixels(probs, torch.tensor([[1.0, 0.1]]), torch.zeros(1, 2, dtype=torch.bool))
    assert (none == -1).all()


def test_upsample_to_view_size_and_scores():
    logits = torch.randn(2, 3, 128, 128)
    probs = upsample_masks(logits, (240, 320))
    assert probs.shape == (2, 3, 240, 320) and probs.min() >= 0 and probs.max() <= 1
    same = upsample_masks(logits, (128, 128))
    assert torch.allclose(same, logits.sigmoid(), atol=1e-6)
    scores = query_scores(torch.tensor([[[0.0, 0.0], [10.0, 0.0]]]))
    assert torch.allclose(scores, torch.tensor([[0.5, 1 / (1 + torch.exp(torch.tensor(-10.0)))]]))


def test_lookup_uses_column_row_order_and_batch():
    pixel_map = torch.arange(2 * 3 * 4).view(2, 3, 4)
    uv = torch.tensor([[3, 0], [0, 2], [1, 1]])
    batch_index = torch.tensor([0, 0, 1])
    assert lookup_points(pixel_map, uv, batch_index).tolist() == [3, 8, 12 + 5]
    probs = torch.rand(2, 5, 3, 4)
    got = point_query_probs(probs, uv, batch_index)
    assert got.shape == (3, 5)
    assert torch.equal(got[2], probs[1, :, 1, 1])


def test_point_mask_features_and_merger():
    torch.manual_seed(0)
    embed = torch.randn(2, 3, 4)
    point_mask = torch.tensor([2, -1, 0, -1])
    batch_index = torch.tensor([0, 0, 1, 1])
    feats_2d, covered = point_mask_features(point_mask, embed, batch_index)
    assert covered.tolist() == [True, False, True, False]
    assert torch.equal(feats_2d[0], embed[0, 2]) and torch.equal(feats_2d[2], embed[1, 0])
    assert (feats_2d[1] == 0).all()
    merger = FeatureMerger(4)
    feats_3d = torch.randn(4, 4, requires_grad=True)
    fused = merger(feats_3d, feats_2d, covered)
    assert torch.equal(fused[1], feats_3d[1]) and torch.equal(fused[3], feats_3d[3])
    want = merger.linear(torch.cat([feats_2d[0], feats_3d[0]]))
    assert torch.allclose(fused[0], want)
    fused[1].sum().backward()  # an uncovered point: gradient goes to its 3D feature only
    assert merger.linear.weight.grad is None or (merger.linear.weight.grad == 0).all()
    assert feats_3d.grad[1].abs().sum() > 0


def test_query_binary_mean_and_gating():
    point_probs = torch.tensor([[0.9, 0.1], [0.8, 0.9], [0.2, 0.7]])
    binary_prob = torch.tensor([1.0, 0.0, 0.5])
    mean, count = query_binary_mean(point_probs, binary_prob, torch.tensor([0, 0, 1]), 2)
    assert count.tolist() == [[2, 1], [0, 1]]
    assert torch.allclose(mean, torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    is_base = torch.tensor([True, False, True])
    logits = torch.zeros(1, 2, 4)
    gated = gate_query_logits(logits, torch.tensor([[0.9, 0.2]]), is_base)
    # query 0 is base: novel column blocked; query 1 is novel: base and null columns blocked
    assert gated[0, 0].tolist() == [0, GATED, 0, 0]
    assert gated[0, 1].tolist() == [GATED, 0, GATED, GATED]

