"""The synthetic open-vocabulary benchmark and the captions-on / captions-off experiment runner."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from storage.benchmarks import BENCHMARK_NAMES, SYNTHETIC_BENCHMARK_NAMES, get_benchmark
from storage.errors import InputError

NAME = "synthetic-b15n4"


def test_synthetic_benchmark_reuses_scannet20_classes_with_its_own_split():
    bench, real = get_benchmark(NAME), get_benchmark("scannet20-b15n4")
    assert NAME in SYNTHETIC_BENCHMARK_NAMES and NAME not in BENCHMARK_NAMES
    assert (bench.dataset, bench.source_id_kind, bench.store_field) == ("scannet", "nyu40", "points/nyu40")
    assert bench.class_names == real.class_names and bench.source_ids == real.source_ids
    assert bench.novel == ("cabinet", "table", "bookshelf", "sink")
    assert (bench.num_classes, len(bench.base_indices), len(bench.novel_indices)) == (19, 15, 4)
    assert set(bench.base) == set(real.class_names) - set(bench.novel)
    assert bench.binary_pos_weight == pytest.approx(4 / 15, abs=1e-3)
    # NYU40 3 = cabinet -> novel; 5 = chair -> base
    labels = bench.map_raw(np.array([3, 5, 0], dtype=np.uint8))
    assert bench.to_binary(labels).tolist() == [0, 1, 255]
    assert bench.to_base(labels)[0] == 255 and bench.to_base(labels)[1] != 255
    with pytest.raises(InputError, match="synthetic-b15n4"):
        get_benchmark("synthetic-b99n1")


def test_novel_classes_occur_in_training_and_held_out_scenes_of_the_default_set():
    """The runner's default: 8 scenes, the last 2 held out; every novel class in both parts."""
    from preprocessing.synthetic import scannet_scene
    from preprocessing.synthetic.categories import CATEGORIES
    from xmask3d.engine.openvocab import OpenVocabConfig

    cfg = OpenVocabConfig()
    bench = get_benchmark(cfg.benchmark)
    novel_ids = {bench.source_ids[i] for i in bench.novel_indices}
    held_out = max(1, cfg.scenes // 4)
    present = []
    for index in range(cfg.scenes):
        scene = scannet_scene(cfg.data_seed, index, small=True)
        present.append({CATEGORIES[o.category].nyu40 for o in scene.geometry.objects
                        if o.category in CATEGORIES and o.annotated})
    train, val = present[:-held_out], present[-held_out:]
    for nyu40 in novel_ids:
        assert sum(nyu40 in s for s in train) >= 2, nyu40
        assert any(nyu40 in s for s in val), nyu40


def test_novel_points_carry_no_training_label_but_captions_name_them(synthetic_store):
    from preprocessing.synthetic.categories import CATEGORIES
    from storage.dataset import SceneViewDataset
    from storage.store import open_store

    bench = get_benchmark(NAME)
    novel = np.asarray(bench.novel_indices)
    dataset = SceneViewDataset(synthetic_store, NAME, split="train", mode="train", seed=0)
    seen_novel = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        is_novel = np.isin(np.asarray(sample["label"]), novel)
        seen_novel += int(is_novel.sum())
        assert (np.asarray(sample["label_base"])[is_novel] == 255).all()
        assert (np.asarray(sample["binary"])[is_novel] == 0).all()
    assert seen_novel > 0
    novel_ids = {bench.source_ids[i] for i in novel}
    words = {w for c in CATEGORIES.values() if c.nyu40 in novel_ids for pair in c.words for w in pair}
    store = open_store(synthetic_store)
    texts = [str(t).lower() for s in store.scene_ids("train") for t in store.scene(s)["captions/text"][:]]
    assert any(w in t for t in texts for w in words)


def test_caption_name_baseline_scores_the_held_out_scenes(synthetic_store):
    from preprocessing.text import build_text_encoder
    from xmask3d.engine.openvocab import caption_name_baseline

    encoder = build_text_encoder("minilm")
    scores = caption_name_baseline(synthetic_store, NAME, encoder)
    assert set(scores) >= {"miou_base", "miou_novel", "hiou"}
    assert all(0.0 <= scores[k] <= 1.0 for k in ("miou_base", "miou_novel", "hiou"))
    assert scores == caption_name_baseline(synthetic_store, NAME, encoder)


def test_config_rejects_bad_conditions_and_seeds():
    from xmask3d.engine.openvocab import OpenVocabConfig

    with pytest.raises(InputError, match="conditions"):
        OpenVocabConfig(conditions=("captions", "labels"))
    with pytest.raises(InputError, match="seed"):
        OpenVocabConfig(seeds=())
    with pytest.raises(InputError, match="scenes"):
        OpenVocabConfig(scenes=1)


@pytest.mark.slow
def test_runner_trains_every_condition_logs_and_summarises(synthetic_scannet, tmp_path):
    """Mechanics only (2 steps per run): one store with view and region captions, one tagged MLflow
    run per condition and seed with that condition's caption losses, both baselines, a summary run."""
    from mlflow import MlflowClient

    from storage.store import open_store
    from xmask3d.engine.openvocab import OpenVocabConfig, report, run_openvocab

    out = tmp_path / "ov"
    shutil.copytree(synthetic_scannet, out / "raw")  # 3 small scenes, seed 0: reused, not rewritten
    cfg = OpenVocabConfig(scenes=3, seeds=(0,), epochs=1, loop=2, max_steps=2, eval_max_views=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_openvocab(out, cfg, tracking_uri=uri, show_progress=False)

    store = open_store(out / "captions.zarr")
    assert store.scene_ids("train") == ["scene0000_00", "scene0001_00"]
    assert all(store.scene(s).has_region_captions for s in store.scene_ids())

    runs = [(r.condition, r.seed, r.steps) for r in result.runs]
    assert runs == [("no-captions", 0, 2), ("official", 0, 2), ("region", 0, 2)]
    client = MlflowClient(tracking_uri=uri)
    expected_terms = {"no-captions": set(), "official": {"loss_explicit_contra_3d"},
                      "region": {"loss_region_3d", "loss_region_fused"}}
    caption_terms = {"loss_explicit_contra", "loss_explicit_contra_3d", "loss_explicit_contra_2d_pre",
                     "loss_region_3d", "loss_region_fused"}
    for record in result.runs:
        run = client.get_run(record.run_id).data
        assert (run.tags["openvocab.condition"], run.tags["openvocab.seed"]) == (record.condition, "0")
        assert not math.isnan(record.metrics["fused/miou_novel"])
        logged = {k.removeprefix("loss/") for k in run.metrics if k.startswith("loss/")} & caption_terms
        assert expected_terms[record.condition] <= logged
        assert not (logged - expected_terms[record.condition] - {"loss_explicit_contra",
                                                                 "loss_explicit_contra_2d_pre"})
        assert run.params["model.mask_regularization"] == "False"  # random MaskCLIP tower in tiny
    summary = client.get_run(result.summary_run_id).data
    assert {"region/3d/miou_novel", "no-captions/fused/hiou", "nearest-class-name/miou_novel",
            "majority-class/miou_base", "gain/region/fused/miou_novel_mean"} <= set(summary.metrics)
    by = {r.condition: r.metrics for r in result.runs}
    assert summary.metrics["gain/region/3d/miou_novel_mean"] == pytest.approx(
        by["region"]["3d/miou_novel"] - by["no-captions"]["3d/miou_novel"])
    text = report(result)
    for row in ("| region | fused |", "| official | 3d |", "| no-captions | 3d |",
                "| majority-class baseline |", "| nearest-class-name baseline |"):
        assert row in text
