"""Evaluation: ensemble, gating, votes across views, nearest-point fill; then the full evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xmask3d.evaluate import NEG, VoteAccumulator, fill_from_nearest, gate, geometric_ensemble

BASE = torch.tensor([0, 1])
NOVEL = torch.tensor([2])


def test_geometric_ensemble_by_hand():
    prob = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    clip = torch.tensor([[0.1, 0.8, 0.1], [0.0, 0.5, 0.5]])  # a zero probability: no NaN allowed
    covered = torch.tensor([True, False])
    out = geometric_ensemble(prob, clip, covered, BASE, NOVEL, base_ratio=0.65, novel_ratio=0.35)
    expected0 = [0.65 * math.log(0.6) + 0.35 * math.log(0.1), 0.65 * math.log(0.3) + 0.35 * math.log(0.8),
                 0.35 * math.log(0.1) + 0.65 * math.log(0.1)]
    assert out[0].tolist() == pytest.approx(expected0, rel=1e-5)
    assert out[1].tolist() == pytest.approx([math.log(0.2), math.log(0.2), math.log(0.6)], rel=1e-5)
    assert torch.isfinite(out).all()
    assert out[0].argmax() == 1  # MaskCLIP flipped the covered point from class 0 to class 1


def test_gate_masks_the_other_split():
    scores = torch.zeros(2, 3)
    out = gate(scores, torch.tensor([0.9, 0.1]), BASE, NOVEL)
    assert out[0].tolist() == [0.0, 0.0, NEG]  # base point: novel column masked
    assert out[1].tolist() == [NEG, NEG, 0.0]  # novel point: base columns masked
    assert scores.abs().sum() == 0  # input untouched


def test_fill_from_nearest():
    xyz = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0.9, 0, 0], [0.1, 0, 0]])
    values = torch.tensor([[1.0], [2.0], [0.0], [0.0]])
    out = fill_from_nearest(values, torch.tensor([True, True, False, False]), xyz)
    assert out.squeeze(1).tolist() == [1.0, 2.0, 2.0, 1.0]


def test_votes_and_unseen_points():
    xyz = np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [2.1, 0, 0]])
    votes = VoteAccumulator(4, 3)
    votes.add(np.array([0, 1, 2]), np.array([0, 1, 2]))
    votes.add(np.array([0, 1]), np.array([0, 2]))
    votes.add(np.array([1]), np.array([2]))
    assert votes.seen.tolist() == [True, True, True, False]
    # point 1: votes 1, 2, 2 -> 2; point 3 never seen -> nearest seen point (2) -> label 2
    assert votes.labels(xyz).tolist() == [0, 2, 2, 2]
    assert VoteAccumulator(2, 3).labels(xyz[:2]).tolist() == [-1, -1]


def test_evaluation_artifacts(tmp_path):
    from plyfile import PlyData

    from xmask3d.evaluate import Evaluation, write_evaluation_artifacts

    names = ("wall", "floor", "chair")
    ious = {"3d": np.array([0.5, 0.25, np.nan]), "2d": np.array([0.1, 0.2, 0.0]),
            "fused": np.array([0.6, 0.3, 0.05])}
    metrics = {f"{h}/{k}": 0.1 for h in ("3d", "2d", "fused", "baseline")
               for k in ("miou_base", "miou_novel", "hiou", "miou_all")}
    xyz = np.random.default_rng(0).random((5, 3)).astype(np.float32)
    evaluation = Evaluation("toy", metrics, ious, {"fused": np.eye(3, dtype=np.int64) * 4}, names, (2,),
                            ["s0"], [{"scene_id": "s0", "xyz": xyz, "gt": np.array([0, 1, 2, 255, 0]),
                                      "pred": np.array([0, 1, 1, 2, 0])}])
    out = write_evaluation_artifacts(evaluation, tmp_path / "eval")
    for png in ("iou_per_class.png", "confusion_fused.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "iou_per_class.md").read_text()
    assert "| chair | novel | – | 0.0 | 5.0 |" in table and "| wall | base | 50.0 | 10.0 | 60.0 |" in table
    gt = PlyData.read(str(out / "ply" / "s0_gt.ply"))["vertex"]
    pred = PlyData.read(str(out / "ply" / "s0_pred.ply"))["vertex"]
    assert len(gt) == 5 and np.allclose(gt["x"], xyz[:, 0])
    assert (gt["red"][3], gt["green"][3], gt["blue"][3]) == (128, 128, 128)  # ignore is grey
    assert (gt["red"][2], gt["green"][2]) != (pred["red"][2], pred["green"][2])  # chair vs floor colour
    assert "fused" in evaluation.table() and "majority-class baseline" in evaluation.table()


def test_cli_bad_model_exit_code_2(tmp_path):
    from typer.testing import CliRunner

    from xmask3d.cli import app

    result = CliRunner().invoke(app, ["evaluate", "--store", str(tmp_path / "s.zarr"), "--benchmark",
                                      "scannet20-b15n4", "--model", str(tmp_path / "nope" / "last.pt")])
    assert result.exit_code == 2
    assert "checkpoint not found" in result.output
    assert not (tmp_path / "mlruns.db").exists()
