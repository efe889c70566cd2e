"""Losses: Hungarian matching, dice/BCE by hand, GT splatting, 3D CE ignore, captions, binary,
mask-regularisation selection rules, per-benchmark recipe."""

import itertools
import math

import pytest
import torch

from xmask3d.network.losses import (
    IGNORE,
    LossConfig,
    SetCriterion,
    binary_loss,
    build_2d_targets,
    caption_loss,
    ce_3d,
    dice_loss,
    loss_weights,
    mask_confidence,
    mask_regularisation,
    select_masks,
    sigmoid_ce_loss,
)
from xmask3d.network.matcher import HungarianMatcher, pairwise_dice, pairwise_sigmoid_ce, point_sample


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_matches_brute_force_permutation_search(seed):
    g = torch.Generator().manual_seed(seed)
    q, m = 5, 3 + seed % 2
    logits = torch.randn(1, q, 4, generator=g)
    masks = torch.randn(1, q, 8, 8, generator=g)
    target = {
        "labels": torch.randint(0, 4, (m,), generator=g),
        "masks": (torch.rand(m, 8, 8, generator=g) > 0.5).float(),
    }
    matcher = HungarianMatcher(num_points=64)
    torch.manual_seed(seed)
    cost = matcher.cost_matrix(logits[0], masks[0], target["labels"], target["masks"])
    torch.manual_seed(seed)  # the same random points inside the call
    ((rows, cols),) = matcher(logits, masks, [target])
    best = min(sum(cost[perm[j], j] for j in range(m)) for perm in itertools.permutations(range(q), m))
    assert len(rows) == m and len(set(rows.tolist())) == m
    assert float(cost[rows, cols].sum()) == pytest.approx(float(best), abs=1e-5)


def test_point_sample_reads_pixel_centres():
    values = torch.arange(12.0).view(1, 1, 3, 4)
    coords = torch.tensor([[[(1 + 0.5) / 4, (2 + 0.5) / 3], [0.5 / 4, 0.5 / 3]]])
    assert point_sample(values, coords)[0, 0].tolist() == pytest.approx([9.0, 0.0], abs=1e-5)


def test_dice_and_bce_against_hand_values():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), -math.log(3.0)]])  # probs .5,.5 and .75,.25
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # dice: 1 - (2*0.5 + 1)/(1 + 1 + 1) = 1/3 ; 1 - (2*0.75 + 1)/(1 + 1 + 1) = 1/6
    assert float(dice_loss(logits, targets, num_masks=2)) == pytest.approx((1 / 3 + 1 / 6) / 2)
    # BCE: ln 2 for both points of mask 0; -ln .75 for both points of mask 1
    assert float(sigmoid_ce_loss(logits, targets, num_masks=1)) == pytest.approx(math.log(2) - math.log(0.75))
    assert pairwise_dice(logits, targets)[0].tolist() == pytest.approx([1 / 3, 1 / 3])
    assert pairwise_sigmoid_ce(logits, targets)[1, 0] == pytest.approx(-math.log(0.75))


def test_criterion_no_target_gives_uniform_ce_and_perfect_masks_beat_wrong():
    cfg = LossConfig(num_points=256)
    crit = SetCriterion(cfg)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8)}]
    losses = crit(torch.zeros(1, 3, 5), torch.zeros(1, 3, 8, 8), empty)
    assert float(losses["loss_ce"]) == pytest.approx(math.log(5))
    assert float(losses["loss_mask"]) == 0.0
    gt = torch.zeros(2, 8, 8)
    gt[0, :4], gt[1, 4:] = 1, 1
    target = [{"labels": torch.tensor([1, 3]), "masks": gt}]
    logits = torch.full((1, 3, 5), -5.0)
    logits[0, 0, 1] = logits[0, 1, 3] = logits[0, 2, 4] = 5.0  # query 2 says "null"
    good = torch.full((1, 3, 8, 8), -8.0)
    good[0, :2] = gt * 16 - 8
    torch.manual_seed(0)
    right = crit(logits, good, target, aux=[{"pred_logits": logits, "pred_masks": good}])
    torch.manual_seed(0)
    wrong = crit(logits, torch.full_like(good, -8.0), target)  # every query predicts an empty mask
    # importance sampling concentrates on the (interpolated) mask borders, so "right" is not ~0
    assert right["loss_ce"] < 0.05 and right["loss_dice"] < 0.3
    assert wrong["loss_dice"] > 0.6 and wrong["loss_mask"] > 2 * right["loss_mask"]
    assert set(right) >= {"loss_ce_0", "loss_mask_0", "loss_dice_0"}
    assert torch.allclose(right["loss_ce_0"], right["loss_ce"])


def test_build_2d_targets_splats_labels_and_null_segment():
    uv = torch.tensor([[0, 0], [1, 0], [1, 0], [3, 3], [2, 2]])  # (col, row) in a 4x4 image
    label = torch.tensor([2, 3, 1, IGNORE, 0])
    batch_index = torch.zeros(5, dtype=torch.long)
    (t,) = build_2d_targets(
        label,
        uv,
        batch_index,
        1,
        num_classes=4,
        image_size=(4, 4),
        mask_size=(4, 4),
        null_segment=True,
        fill_radius=0,
    )
    assert t["labels"].tolist() == [0, 1, 2, 4]  # 4 = null: the ignored point and every empty pixel
    assert t["masks"][t["labels"].tolist().index(1)][0, 1] == 1  # pixel hit by labels 3 and 1 -> 1
    assert t["masks"].sum(0).eq(1).all()  # disjoint and covering
    assert t["masks"][-1].sum() == 16 - 3
    (t,) = build_2d_targets(label, uv, batch_index, 1, 4, (4, 4), (4, 4), null_segment=False, fill_radius=0)
    assert t["labels"].tolist() == [0, 1, 2]
    # half-resolution masks and a one-pixel fill: every pixel gets the smallest nearby label
    (t,) = build_2d_targets(label, uv, batch_index, 1, 4, (4, 4), (2, 2), null_segment=True, fill_radius=1)
    assert t["masks"].shape[1:] == (2, 2)
    assert t["labels"].tolist() == [0, 1]


def test_ce_3d_ignores_255_and_all_ignore_fallback():
    torch.manual_seed(0)
    logits = torch.randn(5, 4)
    labels = torch.tensor([0, IGNORE, 2, IGNORE, 1])
    valid = labels != IGNORE
    want = torch.nn.functional.cross_entropy(logits[valid], labels[valid])
    assert torch.allclose(ce_3d(logits, labels, 3, True), want)
    ignored = torch.full((5,), IGNORE)
    assert float(ce_3d(logits, ignored, 3, all_ignore_fallback=False)) == 0.0
    fake = torch.nn.functional.cross_entropy(logits[:1], torch.tensor([2]))  # official: label C-1 on point 0
    assert torch.allclose(ce_3d(logits, ignored, 3, all_ignore_fallback=True), fake)


def test_caption_loss_per_view_mean_and_has_caption():
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    batch_index = torch.tensor([0, 0, 1, 2])
    captions = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # view 0 aligned (0), view 1 orthogonal (1), view 2 has no caption
    got = caption_loss(feats, batch_index, captions, torch.tensor([True, True, False]))
    assert float(got) == pytest.approx(0.5)
    only_view0 = caption_loss(
        feats,
        batch_index,
        captions,
        torch.tensor([True, True, True]),
        select=torch.tensor([True, False, False, False]),
    )
    assert float(only_view0) == pytest.approx(0.0, abs=1e-6)
    assert float(caption_loss(feats, batch_index, captions, torch.zeros(3, dtype=torch.bool))) == 0.0


def test_binary_loss_pos_weight_and_ignore():
    logits = torch.tensor([0.0, 0.0, 3.0])
    binary = torch.tensor([1.0, 0.0, 255.0])
    # (pos_weight * ln 2 + ln 2) / 2
    assert float(binary_loss(logits, binary, 0.5)) == pytest.approx(0.75 * math.log(2))


def selection_case():
    """Masks over 400 points: 0 novel-ish, 1 base-ish, 2 mixed, 3 tiny, 4..8 novel with confidences."""
    n = 400
    binary = torch.ones(n)
    binary[:30] = 0  # novel points 0..29
    binary[390:] = IGNORE
    inside = torch.zeros(n, 9, dtype=torch.bool)
    inside[0:25, 0] = True  # 20 novel + 5 base: 20 > 1.8*5, 20 > 10 -> novel
    inside[25:30, 0] = True
    inside[100:300, 1] = True  # 200 base
    inside[295:300, 1] = False
    inside[390:395, 1] = True  # 195 base, 5 ignored: 195 > 20*5, 195 > 150 -> base
    inside[0:60, 2] = True  # 30 novel, 30 base -> neither
    inside[0:5, 3] = True  # 5 points < 10 -> dropped
    for k in range(4, 9):
        inside[0:15, k] = True  # 15 novel -> novel
    confidence = torch.tensor([0.1, 0.9, 0.9, 0.9, 0.6, 0.7, 0.8, 0.95, 0.2])
    return inside, binary, confidence


def test_mask_selection_by_labels_keeps_top4_novel_and_top1_base():
    inside, binary, confidence = selection_case()
    chosen = select_masks(inside, binary, confidence, LossConfig())
    assert chosen.nonzero()[:, 0].tolist() == [1, 4, 5, 6, 7]  # mask 0 and 8 lose on confidence
    stricter = select_masks(inside, binary, confidence, LossConfig(contra_top_novel=1, contra_base_min=500))
    assert stricter.nonzero()[:, 0].tolist() == [7]
    # equal confidence: the lower query id wins (a stable sort)
    tied = select_masks(inside, binary, torch.full((9,), 0.5), LossConfig(contra_top_novel=2))
    assert tied.nonzero()[:, 0].tolist() == [0, 1, 4]


def test_mask_regularisation_scores_mode_uses_no_labels_and_stops_gradient():
    inside, binary, confidence = selection_case()
    point_probs = inside.float() * 0.8 + 0.1
    torch.manual_seed(0)
    feats = torch.randn(400, 6, requires_grad=True)
    clip = torch.randn(1, 9, 6, requires_grad=True)
    loss, count = mask_regularisation(point_probs, confidence[None], feats, clip, [400], binary, LossConfig())
    assert count == 5
    inside_1 = inside[:, 1]
    one = 1 - torch.nn.functional.cosine_similarity(feats[inside_1].mean(0), clip[0, 1], dim=0)
    assert float(loss.detach()) > 0 and torch.isfinite(loss)
    loss.backward()
    assert clip.grad is None and feats.grad.abs().sum() > 0
    # "scores": the binary head predicts base everywhere -> only the best base mask is selected
    scores = LossConfig(mask_selection="scores")
    loss_s, count_s = mask_regularisation(
        point_probs, confidence[None], feats, clip, [400], torch.full((400,), 0.9), scores
    )
    assert count_s == 1 and float(loss_s.detach()) == pytest.approx(float(one.detach()), abs=1e-5)
    # nothing selected -> exactly 0
    loss_0, count_0 = mask_regularisation(point_probs * 0, confidence[None], feats, clip, [400], binary,
                                          LossConfig())
    assert count_0 == 0 and float(loss_0.detach()) == 0.0


def test_mask_confidence_is_mean_prob_above_half():
    probs = torch.tensor([[[[0.9, 0.7], [0.2, 0.4]], [[0.1, 0.2], [0.3, 0.4]]]])
    assert mask_confidence(probs).tolist()[0] == pytest.approx([0.8, 0.0])


def test_benchmark_recipe_and_weights():
    cfg = LossConfig().with_benchmark("scannet200-b170n30")
    assert (cfg.binary_weight, cfg.binary_pos_weight, cfg.contra_weight, cfg.contra_start_epoch) == (
        48,
        0.1,
        2,
        75,
    )
    assert not cfg.contra_active(74) and cfg.contra_active(75)
    weights = loss_weights(LossConfig(), aux_layers=2)
    assert weights["loss_ce_1"] == 2 and weights["loss_dice"] == 5 and weights["loss_3d_pure"] == 4
    assert weights["loss_explicit_contra_2d_pre"] == 4 and weights["loss_binary"] == 16
    with pytest.raises(ValueError):
        LossConfig(mask_selection="oracle")


def test_losses_without_valid_points_are_zero_with_finite_gradients():
    """The loss terms use tensor ops instead of host branches: no valid point -> exact 0, no NaN."""
    logits = torch.randn(4, 3, requires_grad=True)
    ce = ce_3d(logits, torch.full((4,), IGNORE), 3, all_ignore_fallback=False)
    binary = binary_loss(logits[:, 0], torch.full((4,), float(IGNORE)), 0.5)
    feats = torch.randn(4, 5, requires_grad=True)
    batch_index = torch.tensor([0, 0, 1, 1])
    captions = torch.randn(2, 5)
    none_captioned = caption_loss(feats, batch_index, captions, torch.zeros(2, dtype=torch.bool))
    # view 1 has a caption but no selected point: only view 0 counts
    partly = caption_loss(feats, batch_index, captions, torch.ones(2, dtype=torch.bool),
                          select=torch.tensor([True, False, False, False]))
    only_0 = 1 - torch.nn.functional.cosine_similarity(feats[0], captions[0], dim=0)
    assert float(ce) == 0.0 and float(binary) == 0.0 and float(none_captioned) == 0.0
    assert float(partly) == pytest.approx(float(only_0), abs=1e-6)
    (ce + binary + none_captioned + partly).backward()
    assert float(logits.grad.abs().sum()) == 0.0
    assert torch.isfinite(feats.grad).all() and float(feats.grad[1:].abs().sum()) == 0.0
