"""The paper's training recipe around the loop: augmentation with the voxel shift, the refusal of
random pretrained weights, validation on a fixed subset of views, the evaluation's point cap, and
what a run leaves in MLflow (metric keys, steps, units, best checkpoint, description)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from storage.benchmarks import get_benchmark
from storage.dataset import SceneViewDataset, scene_labels
from storage.errors import InputError
from storage.store import open_store
from xmask3d.cli import app
from xmask3d.engine import predict as predict_mod
from xmask3d.engine import train as train_mod
from xmask3d.engine.checkpoint import load_checkpoint, save_checkpoint
from xmask3d.engine.evaluate import evaluation_protocol, validation_set
from xmask3d.engine.predict import eval_max_points, load_model_for_inference
from xmask3d.engine.progress import TrainProgress
from xmask3d.engine.tracking import resolve_model
from xmask3d.engine.train import train, train_preset
from xmask3d.network.config import PAPER_CLIP_CHECKPOINT, PAPER_CLIP_MODEL, preset

BENCH = "scannet20-b15n4"


def test_presets_augment_and_validate():
    paper, tiny = train_preset("paper"), train_preset("tiny")
    assert paper.augment and not tiny.augment  # the official recipe; tiny keeps the demo's numbers
    assert paper.val_every > 0 and paper.val_views == 312  # one view per ScanNet val scene
    assert tiny.val_every > 0


def test_voxel_shift_only_in_training(synthetic_store):
    train = SceneViewDataset(synthetic_store, BENCH, split="train", mode="train", augment=True, seed=3)
    mins = np.array([train[i]["voxel_coord"].min(0) for i in range(len(train))])
    assert ((mins >= 0) & (mins < 100)).all()  # integer shift U{0..99} per axis
    assert len({tuple(m) for m in mins}) > len(mins) // 2  # drawn per sample
    again = SceneViewDataset(synthetic_store, BENCH, split="train", mode="train", augment=True, seed=3)
    assert np.array_equal(again[1]["voxel_coord"], train[1]["voxel_coord"])  # seeded
    plain = SceneViewDataset(synthetic_store, BENCH, split="train", mode="train", augment=False, seed=3)
    assert (plain[1]["voxel_coord"].min(0) == 0).all()
    evaluation = SceneViewDataset(synthetic_store, BENCH, split="val", mode="eval", augment=True)
    assert (evaluation[0]["voxel_coord"].min(0) == 0).all()  # no shift outside training


def _no_fit(*args, **kwargs):
    raise AssertionError("training started although the weights are missing")


def test_paper_refuses_random_weights(synthetic_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no weights/open_clip/ViT-L-14-openai.pt here
    monkeypatch.setattr(train_mod, "fit", _no_fit)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = train_preset("paper", checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(InputError) as error:
        train_mod.train(synthetic_store, BENCH, "paper", cfg, tracking_uri=uri)
    message = str(error.value)
    assert "\n" not in message and "--random-init" in message
    assert "--sd-dir" in message and "weights/open_clip/ViT-L-14-openai.pt" in message
    sd = tmp_path / "sd"
    (sd / "unet").mkdir(parents=True)
    clip = tmp_path / "clip.pt"
    with pytest.raises(InputError) as error:
        train_mod.train(synthetic_store, BENCH, "paper", cfg, tracking_uri=uri, sd_dir=sd,
                        clip_checkpoint=clip)
    message = str(error.value)
    assert f"{sd / 'unet' / 'config.json'} not found" in message and f"{clip} not found" in message
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_paper_without_weights_exit_2(synthetic_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--store", str(synthetic_store), "--benchmark", BENCH,
                                      "--preset", "paper", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: preset 'paper' would train with random weights")
    assert "--sd-dir" in lines[0] and "--random-init" in lines[0]


def test_evaluation_refuses_random_paper_model(tmp_path):
    random_paper = dataclasses.asdict(preset("paper", clip_checkpoint=tmp_path / "gone.pt"))
    ckpt = save_checkpoint(tmp_path / "last.pt", {
        "model": {}, "preset": "paper", "benchmark": BENCH, "model_config": random_paper,
        "text_encoder": {"spec": "minilm", "name": "minilm", "dim": 384}})
    expected = r"random weights: no Stable Diffusion.*gone\.pt not found.*--random-init"
    with pytest.raises(InputError, match=expected):
        load_model_for_inference(ckpt, allow_random=False, source="models:/x@champion")


def test_evaluation_point_cap_per_benchmark(synthetic_store, monkeypatch):
    # the official val_keep (XMASK3D_SPEC.md §5): 1e7 on four benchmarks, 65000 on B12N7
    assert eval_max_points("scannet20-b15n4") == 10_000_000
    assert eval_max_points("scannet200-b170n30") == 10_000_000
    assert eval_max_points("scannet20-b12n7") == 65_000
    assert eval_max_points("s3dis-b8n4") == 65_000
    assert "10000000" in evaluation_protocol(get_benchmark(BENCH), 0, "minilm")["valid_view"]
    # the cap decides which views are evaluated
    scene = open_store(synthetic_store).scene(open_store(synthetic_store).scene_ids("val")[0])
    counts = np.diff(scene["proj/offsets"][:])
    valid = counts[counts > 400]
    cap = int(np.median(valid))
    everything = validation_set(synthetic_store, BENCH, 1000)
    monkeypatch.setitem(predict_mod.VAL_KEEP, BENCH, cap)
    capped = validation_set(synthetic_store, BENCH, 1000)
    assert len(everything.items) == len(valid) and 0 < len(capped.items) < len(everything.items)
    assert all(counts[view] < cap for _, view in capped.items)


def test_validation_set_is_fixed(synthetic_store):
    first = validation_set(synthetic_store, BENCH, 4, seed=1)
    second = validation_set(synthetic_store, BENCH, 4, seed=1)
    assert first == second and len(first.items) == 4 and len(set(first.items)) == 4
    store = open_store(synthetic_store)
    bench = get_benchmark(BENCH)
    seen_novel = False
    for scene_id, view in first.items:
        scene = store.scene(scene_id)
        offsets = scene["proj/offsets"][:]
        assert 400 < offsets[view + 1] - offsets[view]
        labels = scene_labels(scene, bench)[scene["proj/point"][offsets[view]:offsets[view + 1]]]
        seen_novel |= bool(np.isin(labels, bench.novel_indices).any())
    assert first.has_novel == seen_novel
    assert first.primary == ("fused/hiou" if seen_novel else "fused/miou_all")


def test_progress_lines_without_terminal(caplog):
    logger = logging.getLogger("test.progress")
    progress = TrainProgress(total_steps=4, start_step=0, iters_per_epoch=2, epochs=2, logger=logger,
                             interval_s=0.0, tty=False)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for epoch in range(2):
            progress.start_epoch(epoch, 0)
            for step in (2 * epoch + 1, 2 * epoch + 2):
                progress.update(step, {"loss/loss": 1.5, "lr/3d": 1e-3, "lr/other": 1e-4})
            progress.end_epoch(epoch, 2 * epoch + 2, 1.25, {"lr/3d": 1e-3, "lr/other": 1e-4})
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epochs) == 2
    assert epochs[1].startswith("epoch 2/2 step 4/4: mean loss 1.2500, lr 3d 0.001 other 0.0001")
    assert all("step/s" in m and "ETA" in m for m in epochs)
    assert progress.bar is None


def _tiny_as_paper(tiny):
    """A stand-in for the model ``preset`` of training: `paper` at tiny sizes (same name, same
    default missing weights and text encoder spec, tiny networks)."""
    def preset(name, sd_dir=None, clip_checkpoint=None):
        assert name == "paper" and sd_dir is None and clip_checkpoint is None
        return dataclasses.replace(tiny, name="paper",
                                   text_encoder=f"openclip:{PAPER_CLIP_MODEL}:{PAPER_CLIP_CHECKPOINT}")

    return preset


@pytest.mark.slow
def test_paper_random_init_run_logs_curves_in_percent(synthetic_store, tmp_path, monkeypatch):
    """`paper` with random_init (tiny networks through a config override) trains with the recipe's
    augmentation, validates every epoch, keeps and registers the best checkpoint, and logs losses
    per step and validation metrics per validation, in percent, to a file-based MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_mod, "model_preset", _tiny_as_paper(preset("tiny")))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # 2 training scenes x loop 2 / batch 2 = 2 steps per epoch, 2 epochs, validation after each
    cfg = train_preset("paper", epochs=2, loop=2, batch_size=2, num_workers=0, torch_threads=1,
                       checkpoint_every=0, log_every=1, val_every=1, val_views=3, eval_max_views=2,
                       ply_scenes=1, lr_3d=3e-3, lr_other=1e-3, contra_start_epoch=1,
                       checkpoint_dir=str(tmp_path / "ckpt"))
    assert cfg.augment
    result = train(synthetic_store, BENCH, "paper", cfg, tracking_uri=uri, random_init=True)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(result.run_id)
    tags, params = run.data.tags, run.data.params
    assert tags["random_init"] == "true" and "--sd-dir" in tags["random_init.parts"]
    assert params["train.augment"] == "True" and params["data.text_encoder"] == "minilm"

    def steps(key):
        return sorted(m.step for m in client.get_metric_history(result.run_id, key))

    assert steps("loss/loss") == [1, 2, 3, 4]
    assert steps("lr/3d") == [1, 2, 3, 4]
    for key in ("val/fused/hiou", "val/fused/miou_base", "val/3d/miou_all", "val/2d/accuracy"):
        assert steps(key) == [2, 4], key  # one point per validation: a curve, not a dot
    values = [m.value for k in ("val/fused/miou_all", "val/3d/miou_all", "val/fused/accuracy")
              for m in client.get_metric_history(result.run_id, k)]
    assert all(0.0 <= v <= 100.0 for v in values) and max(values) > 1.0  # percent, not fractions
    metrics = run.data.metrics
    assert metrics["eval/fused/miou_base"] == pytest.approx(100 * result.metrics["fused/miou_base"])
    assert metrics["eval/baseline/miou_base"] == pytest.approx(100 * result.metrics["baseline/miou_base"])
    assert steps("eval/fused/hiou") == [4]

    # the best validation checkpoint is kept and registered
    best_step = int(tags["best.step"])
    assert best_step in (2, 4) and tags["best.metric"] in ("val/fused/hiou", "val/fused/miou_all")
    history = {m.step: m.value for m in client.get_metric_history(result.run_id, tags["best.metric"])}
    assert history[best_step] == max(history.values())
    record = json.loads((tmp_path / "ckpt" / result.run_id / "best.json").read_text())
    assert record["step"] == best_step
    assert load_checkpoint(tmp_path / "ckpt" / result.run_id / "best.pt")["step"] == best_step
    assert tags["registered_checkpoint"] == ("best.pt" if best_step != 4 else "last.pt")
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/last.pt", "checkpoints/best.pt"}
    version = client.get_model_version_by_alias("xmask3d-scannet20-b15n4", "candidate")
    assert version.run_id == result.run_id
    checkpoint, _ = resolve_model(result.model_uri, uri, tmp_path / "registered")
    assert checkpoint.name == tags["registered_checkpoint"]
    assert load_checkpoint(checkpoint)["step"] == best_step

    # description: which model, and links to the panels and the PLY files
    note = tags["mlflow.note.content"]
    assert f"of step {best_step}" in note and "panels/" in note and "_pred.ply" in note
    exported = {a.path for a in client.list_artifacts(result.run_id, "evaluation/ply")}
    assert any(path.split("/")[-1] in note for path in exported)
    summary = json.loads(Path(client.download_artifacts(result.run_id, "evaluation/metrics.json",
                                                        str(tmp_path))).read_text())
    assert summary["unit"] == "percent"
    assert summary["metrics"]["fused/miou_base"] == pytest.approx(metrics["eval/fused/miou_base"])
