"""Metric code against a hand-computed example (accumulated over scenes, ignore 255)."""

import numpy as np
import pytest

from xmask3d.metrics import (
    ConfusionAccumulator,
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
