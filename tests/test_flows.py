"""The Prefect flows: task functions through ``.fn`` (no API), the preprocess flow on the ephemeral API.

The flow tests share the session's ``prefect_test_harness`` (the ``prefect_api`` fixture of
tests/fixtures_prefect.py). The server-and-worker path is in test_prefect_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows import preprocess as pf
from preprocessing.pipeline import preprocess_scannet_scene
from preprocessing.run import local_workers
from storage.errors import InputError
from storage.store import open_store
from tests.http_server import serve_directory
from tests.test_pipeline import assert_same_scene
from tests.worker_probe import heavy_modules


def scene_ids(raw: Path) -> list[str]:
    return sorted(p.name for p in (Path(raw) / "scans").iterdir())


def linked_copy(raw: Path, dst: Path) -> Path:
    """``raw`` as a tree of symlinks (cheap), so a test can replace single files."""
    for path in Path(raw).rglob("*"):
        target = dst / path.relative_to(raw)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return dst


# --- tasks, without an API ----------------------------------------------------------------------


def test_prepare_store_names_a_missing_raw_dir_and_an_unknown_scene(synthetic_scannet, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(InputError, match=f"raw dir {missing} does not exist"):
        pf.prepare_store.fn("scannet", str(missing), str(tmp_path / "a.zarr"))
    with pytest.raises(InputError, match="scene0999_00"):
        pf.prepare_store.fn("scannet", str(synthetic_scannet), str(tmp_path / "b.zarr"),
                            scenes=["scene0999_00"], captions="none")
    assert not (tmp_path / "a.zarr").exists()
    assert not (tmp_path / "b.zarr").exists()  # validation happens before the store is created


def test_skip_complete_reports_a_scene_written_before(synthetic_scannet, tmp_path):
    first = scene_ids(synthetic_scannet)[0]
    store = str(tmp_path / "s.zarr")
    listing, cfg = pf.prepare_store.fn("scannet", str(synthetic_scannet), store, scenes=[first],
                                       captions="none", region_captions="none")
    assert list(listing) == [first]
    assert pf.skip_complete(store, listing, "scannet", str(synthetic_scannet), cfg) == {}
    summary = preprocess_scannet_scene(synthetic_scannet, first, store, cfg, listing[first])
    assert summary.status == "written" and summary.points > 0 and summary.frames_kept > 0
    skipped = pf.skip_complete(store, listing, "scannet", str(synthetic_scannet), cfg)[first]
    assert skipped.status == "skipped"
    assert (skipped.points, skipped.frames_kept) == (summary.points, summary.frames_kept)


def test_embed_captions_task_embeds_every_text_of_the_run_once(synthetic_scannet, tmp_path):
    raw = Path(synthetic_scannet)
    listing, cfg = pf.prepare_store.fn("scannet", str(raw), str(tmp_path / "s.zarr"), frame_step=20,
                                       text_encoder="openclip-tiny")
    captions = json.loads((raw / "captions.json").read_text())
    regions = json.loads((raw / "region_captions.json").read_text())["scenes"]
    expected = {text for s in listing for i, text in captions[s].items() if int(i) % 20 == 0}
    expected |= {r["text"] for s in listing for i, rs in regions[s].items() if int(i) % 20 == 0 for r in rs}
    from prefect.logging import disable_run_logger

    with disable_run_logger():  # the task logs to its run; here there is none
        table = pf.embed_captions.fn("scannet", list(listing), cfg)
    assert table.encoder == "openclip-tiny" and sorted(table.texts) == sorted(expected)
    assert table.vectors.shape == (len(expected), 64) and table.vectors.dtype == np.float16
    norms = np.linalg.norm(table.vectors.astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-2)
    some = sorted(expected)[:3]
    rows = table.lookup(["", *some])
    assert not rows[0].any()
    np.testing.assert_array_equal(rows[1:], table.select(some).vectors)
    _, none = pf.prepare_store.fn("scannet", str(raw), str(tmp_path / "n.zarr"), captions="none",
                                  region_captions="none")
    with disable_run_logger():
        assert pf.embed_captions.fn("scannet", list(listing), none) is None


def test_download_task_fetches_over_http_and_retries_with_backoff(synthetic_scannet, tmp_path, monkeypatch):
    assert pf.download.retries == 3 and pf.download.retry_delay_seconds == [2, 4, 8]
    first = scene_ids(synthetic_scannet)[0]
    raw = tmp_path / "raw"
    with serve_directory(Path(synthetic_scannet)) as url:
        monkeypatch.setenv("XMASK3D_SCANNET_URL", url)  # the URL is never a parameter
        assert pf.download.fn("scannet", str(raw), url_from="env", scenes=[first]) == str(raw)
    source = Path(synthetic_scannet) / "scans" / first / f"{first}.sens"
    assert (raw / "scans" / first / f"{first}.sens").read_bytes() == source.read_bytes()
    assert scene_ids(raw) == [first]


def test_local_workers_are_bounded_by_scenes_and_validated():
    assert local_workers(4, 2) == 2
    assert local_workers(1, 5) == 1
    assert local_workers(None, 1) == 1
    with pytest.raises(InputError, match="workers"):
        local_workers(0, 3)


# --- the flow on the ephemeral API ----------------------------------------------------------------


def _read(flow_run_id, key: str) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert found, f"no artifact {key}"
    return json.loads(found[0].data) if found[0].type == "table" else [{"markdown": found[0].data}]


def _logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10, at_exit=False)  # logs are sent in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(entry.message for entry in logs)


@pytest.mark.slow
def test_flow_keeps_good_scenes_when_one_fails_and_skips_them_on_rerun(prefect_api, synthetic_scannet,
                                                                       tmp_path):
    good, bad = scene_ids(synthetic_scannet)[:2]
    raw = linked_copy(Path(synthetic_scannet), tmp_path / "raw")
    sens = raw / "scans" / bad / f"{bad}.sens"
    sens.unlink()
    sens.write_bytes(b"not a sens file")
    store = tmp_path / "s.zarr"

    state = pf.preprocess(raw_dir=str(raw), store=str(store), scenes=[good, bad], captions="none", workers=1,
                          return_state=True)
    assert state.is_failed()
    assert f"1 of 2 scenes failed: {bad}" in state.message
    with pytest.raises(pf.ScenesFailedError) as failure:
        state.result()
    assert [(x.scene_id, x.status) for x in failure.value.summaries] == [(good, "written"), (bad, "failed")]
    assert open_store(store).scene_ids() == [good]  # the good scene is stored, the bad one is not
    table = _read(state.state_details.flow_run_id, "preprocess-scannet-scenes")
    assert [(r["scene"], r["status"]) for r in table] == [(good, "written"), (bad, "failed")]
    assert table[0]["points"] > 0 and table[0]["frames_kept"] > 0
    assert f"scene {bad} failed: InputError" in _logs(state.state_details.flow_run_id)
    assert "failed" in _read(state.state_details.flow_run_id, "preprocess-scannet-summary")[0]["markdown"]

    state = pf.preprocess(raw_dir=str(raw), store=str(store), scenes=[good], captions="none", workers=1,
                          return_state=True)
    assert state.is_completed()
    assert [(x.scene_id, x.status) for x in state.result()] == [(good, "skipped")]
    assert f"skipped scene {good} (complete in store)" in _logs(state.state_details.flow_run_id)


@pytest.mark.slow
def test_flow_runs_plain_scene_tasks_on_an_existing_dask_cluster(prefect_api, synthetic_scannet,
                                                                 synthetic_store, tmp_path):
    """With view and region captions (MiniLM): the worker runs the scene without importing
    Prefect or torch, and the scene equals the one the plain function wrote in one process."""
    from distributed import Client, LocalCluster

    scenes = scene_ids(synthetic_scannet)[:2]
    store = tmp_path / "s.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        state = pf.preprocess(raw_dir=str(synthetic_scannet), store=str(store), scenes=scenes,
                              dask_address=cluster.scheduler_address, return_state=True)
        assert "preprocess_scene" in cluster.scheduler.task_prefixes  # the scene tasks ran on this cluster
        assert list(client.run(heavy_modules).values()) == [[]]  # no torch, transformers, Prefect
    assert [(x.scene_id, x.status) for x in state.result()] == [(s, "written") for s in scenes]
    opened, reference = open_store(store), open_store(synthetic_store)
    assert opened.scene_ids() == scenes
    for scene_id in scenes:
        assert opened.scene(scene_id).attrs["frames_without_caption"] == []
        assert_same_scene(opened.scene(scene_id), reference.scene(scene_id))
    flow_run = state.state_details.flow_run_id
    logs = _logs(flow_run)
    assert "embedded" in logs and "caption texts of 2 scenes with minilm" in logs
    assert all(f"written scene {s}" in logs for s in scenes)
    progress = _read(flow_run, "preprocess-scannet-progress")[0]["markdown"]
    assert float(progress) == 100.0


@pytest.mark.slow
def test_flow_fails_with_the_bad_input_message(prefect_api, tmp_path):
    missing = tmp_path / "nowhere"
    state = pf.preprocess(raw_dir=str(missing), store=str(tmp_path / "s.zarr"), return_state=True)
    assert state.is_failed() and f"raw dir {missing} does not exist" in state.message
    with pytest.raises(InputError, match="does not exist"):  # a direct call raises the error itself
        pf.preprocess(raw_dir=str(missing), store=str(tmp_path / "s.zarr"))


@pytest.mark.slow
def test_retrain_in_process_keeps_a_model_below_the_baseline_candidate(prefect_api, synthetic_scannet,
                                                                      synthetic_store, tmp_path):
    import shutil

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from flows.retrain import retrain

    store = tmp_path / "scannet.zarr"
    shutil.copytree(synthetic_store, store)  # every scene complete: the preprocess step skips them
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # two steps at learning rate 0: the random init, which cannot beat the majority-class baseline
    quick = {"max_steps": 2, "lr_3d": 0.0, "lr_other": 0.0, "eval_max_views": 1, "ply_scenes": 1,
             "checkpoint_dir": str(tmp_path / "ckpt")}
    params = {"raw_dir": str(synthetic_scannet), "store": str(store), "benchmark": "scannet20-b15n4",
              "preset": "tiny", "train_config": quick, "max_views": 1, "tracking_uri": uri, "workers": 1}

    state = retrain(**params, return_state=True)  # no deployment: train and evaluate run in process
    assert state.is_completed(), state.message
    result = state.result()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert result["model_version"] == "1" and result["promoted"] is False
    assert result["metric"] == "fused/hiou"  # the val scene (an office) holds novel classes
    assert "majority-class baseline" in result["reason"] or "not finite" in result["reason"]
    version = client.get_model_version("xmask3d-scannet20-b15n4", "1")
    assert version.tags["promotion"] == "candidate" and version.tags["promotion.reason"] == result["reason"]
    assert str(client.get_model_version_by_alias("xmask3d-scannet20-b15n4", "candidate").version) == "1"
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("xmask3d-scannet20-b15n4", "champion")


@pytest.mark.slow
def test_train_flow_progress_reaches_the_flow_run_logs(prefect_api, synthetic_store, tmp_path):
    """Per-epoch progress and validation lines of training are in the flow run's Prefect logs
    (what the UI shows), as plain lines without carriage returns."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.train import train as train_flow

    # 2 training scenes x loop 2 / batch 2 = 2 steps = one epoch, validated after its last step
    config = {"max_steps": 2, "loop": 2, "evaluate": False, "val_views": 2,
              "checkpoint_dir": str(tmp_path / "ckpt")}
    state = train_flow(store=str(synthetic_store), benchmark="scannet20-b15n4", preset="tiny",
                       train_config=config, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                       promote_champion=False, return_state=True)
    assert state.is_completed()
    APILogHandler().flush()
    run_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        logs = client.read_logs(run_filter)
    messages = [entry.message for entry in logs]
    epochs = [m for m in messages if m.startswith("epoch 1/6 step 2/2: mean loss")]
    assert len(epochs) == 1 and "step/s" in epochs[0] and "ETA" in epochs[0]
    assert any(m.startswith("validation at epoch 1 step 2 (2 views") for m in messages)
    assert not any("\r" in m for m in messages)
