"""``evaluate_loaded`` on a known prediction, against metrics worked out by hand.

The stored validation scenes are evaluated with stand-in predictions (no model): the fused head is
the ground truth except that every point of one base class A is called novel class N; the 3D head
calls every point N. With n_A, n_N the counts of A and N, L the labelled points and P_b, P_n the
base / novel classes present, the IoUs are: fused, A 0, N n_N / (n_N + n_A), every other present
class 1; 3D, N n_N / L, every other present class 0.
"""

from __future__ import annotations

import numpy as np
import pytest

from storage.benchmarks import get_benchmark
from storage.dataset import scene_labels
from storage.store import open_store
from xmask3d.engine import evaluate as evaluate_mod
from xmask3d.engine.evaluate import evaluate_loaded
from xmask3d.engine.metrics import IGNORE_INDEX
from xmask3d.engine.predict import ScenePrediction

BENCH = "scannet20-b15n4"


def test_metrics_of_a_known_prediction_by_hand(synthetic_store, monkeypatch):
    bench = get_benchmark(BENCH)
    store = open_store(synthetic_store)
    gts = {s: scene_labels(store.scene(s), bench).astype(np.int64) for s in store.scene_ids("val")}
    labelled = np.concatenate([g[g != IGNORE_INDEX] for g in gts.values()])
    counts = np.bincount(labelled, minlength=bench.num_classes)
    base = [int(i) for i in bench.base_indices if counts[i] > 0]
    novel = [int(i) for i in bench.novel_indices if counts[i] > 0]
    assert len(base) >= 2 and novel, "the validation scenes need two base classes and a novel one"
    a = max(base, key=lambda i: counts[i])
    n = max(novel, key=lambda i: counts[i])
    n_a, n_n, total = int(counts[a]), int(counts[n]), len(labelled)

    def known_predictions(loaded, store_path, bench, scene_ids, max_views=0, show_progress=True):
        for scene_id in scene_ids:
            gt = gts[scene_id]
            fused = np.where(gt == a, n, np.where(gt == IGNORE_INDEX, 0, gt))
            heads = {"fused": fused, "3d": np.full(len(gt), n), "2d": fused}
            yield ScenePrediction(scene_id, fused, tuple(bench.class_names), heads)

    monkeypatch.setattr(evaluate_mod, "predict_scenes", known_predictions)
    m = evaluate_loaded(None, synthetic_store, BENCH, ply_scenes=0, panel_scenes=0).metrics

    fused_base = (len(base) - 1) / len(base)
    fused_novel = (len(novel) - 1 + n_n / (n_n + n_a)) / len(novel)
    assert m["fused/miou_base"] == pytest.approx(fused_base, abs=1e-9)
    assert m["fused/miou_novel"] == pytest.approx(fused_novel, abs=1e-9)
    fused_hiou = 2 * fused_base * fused_novel / (fused_base + fused_novel)
    assert m["fused/hiou"] == pytest.approx(fused_hiou, abs=1e-9)
    assert m["fused/miou_all"] == pytest.approx((len(base) + len(novel) - 2 + n_n / (n_n + n_a))
                                                / (len(base) + len(novel)), abs=1e-9)
    assert m["fused/accuracy"] == pytest.approx((total - n_a) / total, abs=1e-9)
    assert m[f"fused/iou/{bench.class_names[a]}"] == 0.0
    assert m[f"fused/iou/{bench.class_names[n]}"] == pytest.approx(n_n / (n_n + n_a), abs=1e-9)

    assert m["3d/miou_base"] == 0.0 and m["3d/hiou"] == 0.0
    assert m["3d/miou_novel"] == pytest.approx(n_n / total / len(novel), abs=1e-9)
    assert m["3d/accuracy"] == pytest.approx(n_n / total, abs=1e-9)
