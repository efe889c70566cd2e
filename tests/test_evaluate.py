"""Evaluation: ensemble, gating, votes across views, nearest-point fill; then the full evaluation
(metrics, boundary IoU, table, artifacts)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from storage.dataset import scene_labels
from storage.store import open_store
from xmask3d.engine import evaluate as evaluate_mod
from xmask3d.engine.evaluate import evaluate_loaded, log_evaluation
from xmask3d.engine.metrics import IGNORE_INDEX, boundary_mask
from xmask3d.engine.predict import (
    HEADS,
    NEG,
    ScenePrediction,
    VoteAccumulator,
    fill_from_nearest,
    gate,
    geometric_ensemble,
)

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

    from xmask3d.engine.evaluate import Evaluation, write_evaluation_artifacts

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


class _Run:
    """Stands in for tracking.RunTracker: records what log_evaluation logs."""

    run_id = "0123abcd"

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.artifacts: list[str] = []
        self.tags: dict[str, str] = {}
        self.metrics_json: dict = {}

    def log_metrics(self, metrics, step):
        self.metrics.update(metrics)

    def log_artifacts(self, path, artifact_path=None):
        import json

        self.artifacts.extend(sorted(p.name for p in path.iterdir()))
        self.metrics_json = json.loads((path / "metrics.json").read_text())

    def set_tags(self, tags):
        self.tags.update({k: str(v) for k, v in tags.items()})


def test_evaluation_reports_boundary_iou(synthetic_store, monkeypatch):
    """evaluate_loaded on the stored validation scenes with stand-in predictions (no model): fused is
    the ground truth, 3d is the ground truth except on every boundary point, 2d saw no view."""
    bench_name = "scannet20-b15n4"

    def fake_predict_scenes(loaded, store_path, bench, scene_ids, max_views=0, show_progress=True):
        store = open_store(store_path)
        for scene_id in scene_ids:
            scene = store.scene(scene_id)
            gt = scene_labels(scene, bench).astype(np.int64)
            perfect = np.where(gt == IGNORE_INDEX, 0, gt)
            near = boundary_mask(scene["points/xyz"][:], gt)
            assert near.any() and not near.all()
            wrong_on_boundary = np.where(near, (perfect + 1) % bench.num_classes, perfect)
            heads = {"3d": wrong_on_boundary, "2d": np.full(len(gt), -1), "fused": perfect}
            yield ScenePrediction(scene_id, perfect, tuple(bench.class_names), heads)

    monkeypatch.setattr(evaluate_mod, "predict_scenes", fake_predict_scenes)
    evaluation = evaluate_loaded(None, synthetic_store, bench_name, ply_scenes=0, panel_scenes=0)
    m = evaluation.metrics
    for head in HEADS:
        assert {f"{head}/boundary_miou_base", f"{head}/boundary_miou_novel", f"{head}/boundary_hiou",
                f"{head}/boundary_miou_all"} <= set(m)
    assert 0.0 < m["boundary/points"] < 1.0
    assert m["fused/miou_all"] == 1.0 and m["fused/boundary_miou_all"] == 1.0
    assert m["fused/boundary_miou_base"] == 1.0
    # wrong on exactly the boundary points: boundary IoU 0, overall IoU still high
    assert m["3d/boundary_miou_all"] == 0.0 and m["3d/boundary_miou_base"] == 0.0
    assert m["3d/miou_all"] > 0.5
    assert m["2d/boundary_miou_all"] == 0.0 and m["2d/miou_all"] == 0.0

    lines = evaluation.table().splitlines()
    assert lines[0].split() == ["head", "mIoU", "base", "mIoU", "novel", "hIoU", "mIoU", "all",
                                "bnd", "base", "bnd", "novel", "bnd", "hIoU"]
    fused = lines[HEADS.index("fused") + 1].split()
    assert fused[0] == "fused" and fused[1] == fused[5] == "100.0"  # mIoU base, bnd base
    assert lines[-1].startswith("majority-class baseline") and lines[-1].split()[-3:] == ["–", "–", "–"]

    run = _Run()
    log_evaluation(run, evaluation, step=3)
    logged = {f"eval/{h}/boundary_{k}" for h in HEADS for k in ("miou_base", "miou_novel", "hiou")}
    assert logged <= set(run.metrics)
    # scores are logged in percent (as the table), fractions stay in Evaluation.metrics
    assert run.metrics["eval/fused/boundary_miou_base"] == pytest.approx(100.0)
    assert run.metrics["eval/3d/miou_all"] == pytest.approx(100 * m["3d/miou_all"])
    assert run.metrics["eval/boundary/points"] == pytest.approx(100 * m["boundary/points"])
    assert run.metrics["eval/baseline/majority_class"] == m["baseline/majority_class"]  # an index
    assert "metrics.json" in run.artifacts and "iou_per_class.md" in run.artifacts
    assert run.metrics_json["unit"] == "percent"
    assert run.metrics_json["metrics"]["fused/miou_all"] == pytest.approx(100.0)
    assert run.tags["baseline.majority_class"] in evaluation.class_names
    note = run.tags["mlflow.note.content"]
    assert "| fused | 100.0 |" in note
    assert "get-artifact?path=evaluation/iou_per_class.png&run_uuid=0123abcd" in note


def test_run_description_links_panels_and_plys():
    from xmask3d.engine.evaluate import Evaluation, run_description

    metrics = {"fused/hiou": 0.5, "fused/miou_base": 0.25, "fused/miou_novel": math.nan}
    evaluation = Evaluation("toy", metrics, {}, {}, ("a", "b"), (1,), ["s0", "s1"],
                            [{"scene_id": "s0"}], panels={"s0_view3.png": b"", "s0_topdown.png": b""})
    note = run_description(evaluation, "run42", header="Model: best.pt")
    assert note.startswith("Model: best.pt")
    assert "| fused | 25.0 | – | 50.0 | – |" in note  # percent, "–" where undefined
    for path in ("panels/s0_view3.png", "panels/s0_topdown.png", "ply/s0_pred.ply", "ply/s0_gt.ply"):
        assert f"(get-artifact?path=evaluation/{path}&run_uuid=run42)" in note


def test_cli_bad_model_exit_code_2(tmp_path):
    from typer.testing import CliRunner

    from xmask3d.cli import app

    result = CliRunner().invoke(app, ["evaluate", "--store", str(tmp_path / "s.zarr"), "--benchmark",
                                      "scannet20-b15n4", "--model", str(tmp_path / "nope" / "last.pt")])
    assert result.exit_code == 2
    assert "checkpoint not found" in result.output
    assert not (tmp_path / "mlruns.db").exists()
