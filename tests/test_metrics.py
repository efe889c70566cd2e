"""Metric code against hand-computed examples (accumulated over scenes, ignore 255, boundary IoU)."""

import numpy as np
import pytest

from xmask3d.engine.metrics import (
    ConfusionAccumulator,
    boundary_mask,
    harmonic_iou,
    majority_class_baseline,
    split_scores,
)


def test_hand_computed_two_scenes():
    # T = 3 classes, base = {0, 1}, novel = {2}.
    acc = ConfusionAccumulator(3)
    acc.update(pred=np.array([0, 1, 1, 1, 2, 0]), target=np.array([0, 0, 1, 1, 2, 255]))
    acc.update(pred=np.array([2, 0, 0]), target=np.array([2, 2, 0]))
    # By hand: class 0: I=2, GT=3, pred=3 -> U=4; class 1: I=2, GT=2, pred=3 -> U=3;
    # class 2: I=2, GT=3, pred=2 -> U=3.
    np.testing.assert_array_equal(acc.intersection, [2, 2, 2])
    np.testing.assert_array_equal(acc.union, [4, 3, 3])
    np.testing.assert_allclose(acc.iou(), [0.5, 2 / 3, 2 / 3])
    scores = split_scores(acc.iou(), base_indices=[0, 1], novel_indices=[2])
    assert scores.miou_base == pytest.approx((0.5 + 2 / 3) / 2)
    assert scores.miou_novel == pytest.approx(2 / 3)
    # hIoU = 2BN/(B+N) = 2 * 0.58333 * 0.66667 / 1.25
    assert scores.hiou == pytest.approx(0.6222222, abs=1e-6)
    # Accumulated, not a mean of per-scene IoUs: class 2 per scene is 1.0 and 0.5 (mean 0.75).
    assert acc.iou()[2] != pytest.approx(0.75)


def test_ignore_and_absent_classes():
    acc = ConfusionAccumulator(4)
    acc.update(pred=np.array([0, 0, 1]), target=np.array([0, 255, 1]))
    iou = acc.iou()
    assert iou[0] == 1.0 and iou[1] == 1.0
    assert np.isnan(iou[2]) and np.isnan(iou[3])  # never in GT, never predicted
    scores = split_scores(iou, [0, 1], [2, 3])
    assert scores.miou_base == 1.0 and np.isnan(scores.miou_novel) and np.isnan(scores.hiou)


def test_bad_labels_raise():
    acc = ConfusionAccumulator(2)
    with pytest.raises(ValueError, match="ground-truth"):
        acc.update(np.array([0]), np.array([5]))
    with pytest.raises(ValueError, match="predicted"):
        acc.update(np.array([7]), np.array([1]))
    with pytest.raises(ValueError, match="points"):
        acc.update(np.array([0, 1]), np.array([1]))


def test_harmonic_zero_and_merge():
    assert harmonic_iou(0.0, 0.0) == 0.0
    assert harmonic_iou(0.5, 0.0) == 0.0
    a, b = ConfusionAccumulator(2), ConfusionAccumulator(2)
    a.update(np.array([0]), np.array([0]))
    b.update(np.array([1]), np.array([0]))
    a.merge(b)
    np.testing.assert_array_equal(a.matrix, [[1, 1], [0, 0]])


def test_majority_baseline():
    majority, acc = majority_class_baseline(
        train_labels=[np.array([1, 1, 0, 255]), np.array([1, 2])],
        val_labels=[np.array([0, 1, 1, 255])], num_classes=3)
    assert majority == 1
    iou = acc.iou()
    assert iou[0] == 0.0 and iou[1] == pytest.approx(2 / 3) and np.isnan(iou[2])


def _cm(values):
    return np.asarray(values, dtype=np.float64) / 100


def test_boundary_mask_two_slabs_and_ignore():
    # Two slabs meeting at the plane x = 0, points 1 cm apart, on a 3×3 grid of (y, z) 1 cm apart:
    # label 0 at x = -(k + 0.25) cm and label 1 at x = +(k + 0.25) cm, k = 0..9; then an ignored
    # slab (255) at x = 10.25..14.25 cm right behind label 1. A point's nearest point of the other
    # slab is the one on the same (y, z) line, (k + 0.5) cm away (never exactly 5 cm), so with
    # r = 5 cm the points with k <= 4 (within 4.25 cm of the plane) are boundary points and those
    # with k >= 5 are not. The ignored slab is 1 cm from label 1's k = 9 points: no boundary there.
    k = np.arange(10)
    x = _cm(np.concatenate([-(k + 0.25), k + 0.25, 10.25 + np.arange(5)]))
    row_labels = np.array([0] * 10 + [1] * 10 + [255] * 5)
    yz = _cm([(y, z) for y in range(3) for z in range(3)])
    xyz = np.array([[xi, y, z] for xi in x for y, z in yz])
    labels = np.repeat(row_labels, len(yz))
    mask = boundary_mask(xyz, labels)  # default radius 0.05 m
    assert mask.shape == (25 * 9,) and mask.dtype == bool
    T, F = True, False
    expected_rows = [T, T, T, T, T, F, F, F, F, F,   # label 0, k = 0..9
                     T, T, T, T, T, F, F, F, F, F,   # label 1, k = 0..9
                     F, F, F, F, F]                  # ignored points are never boundary points
    np.testing.assert_array_equal(mask.reshape(25, 9), np.repeat(np.array(expected_rows)[:, None], 9, 1))
    # r = 2 cm: only k = 0, 1 (0.5 and 1.5 cm to the nearest point across)
    narrow = boundary_mask(xyz, labels, radius=0.02).reshape(25, 9)[:, 0]
    assert np.flatnonzero(narrow).tolist() == [0, 1, 10, 11]
    # all ignored except one slab: a single valid class has no boundary at all
    assert not boundary_mask(xyz, np.where(labels == 0, 255, labels)).any()
    assert boundary_mask(np.zeros((0, 3)), np.zeros(0, dtype=np.int64)).shape == (0,)
    with pytest.raises(ValueError, match="labels"):
        boundary_mask(xyz, labels[:-1])


def test_boundary_iou_perfect_and_shifted_interface():
    # A line of points 1 cm apart: ground truth 0 at x = -(k + 0.25) cm, 1 at x = +(k + 0.25) cm,
    # k = 0..19 (20 points each). Boundary points (r = 5 cm): k = 0..4 on each side, 10 points.
    k = np.arange(20)
    x = _cm(np.concatenate([-(k + 0.25), k + 0.25]))
    xyz = np.stack([x, np.zeros_like(x), np.zeros_like(x)], 1)
    gt = np.array([0] * 20 + [1] * 20)
    boundary = boundary_mask(xyz, gt)
    assert boundary.sum() == 10

    def scores(pred):
        overall, near = ConfusionAccumulator(2), ConfusionAccumulator(2)
        overall.update(pred, gt)
        near.update(pred[boundary], gt[boundary])
        return overall.iou(), near.iou()

    iou, bnd = scores(gt.copy())
    np.testing.assert_array_equal(iou, [1.0, 1.0])
    np.testing.assert_array_equal(bnd, [1.0, 1.0])  # perfect prediction: 100 % boundary IoU

    # The predicted interface moves 3 cm into class 1: the class-1 points at 0.25, 1.25, 2.25 cm
    # are predicted 0. Overall: class 0 I = 20, U = 23; class 1 I = 17, U = 20.
    # On the boundary points: class 0 I = 5, U = 5 + 3 = 8; class 1 I = 2, U = 5.
    iou, bnd = scores((x > 0.03).astype(np.int64))
    np.testing.assert_allclose(iou, [20 / 23, 17 / 20])
    np.testing.assert_allclose(bnd, [5 / 8, 2 / 5])
    overall = split_scores(iou, base_indices=[0], novel_indices=[1])
    near = split_scores(bnd, base_indices=[0], novel_indices=[1])
    assert overall.miou_all == pytest.approx(0.859783, abs=1e-6)  # (20/23 + 17/20) / 2
    assert near.miou_all == pytest.approx(0.5125)  # (0.625 + 0.4) / 2
    assert near.hiou == pytest.approx(2 * 0.625 * 0.4 / 1.025)  # 0.4878
    # boundary mIoU loses 48.8 points, overall mIoU 14.0: more than three times as much
    assert 1 - near.miou_all > 3 * (1 - overall.miou_all)
