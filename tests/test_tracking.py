"""MLflow tracking: a real `mlflow server` (e2e) and temp-SQLite tests of params, aliases, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from storage.errors import InputError
from tests.servers import free_port, stop, wait_healthy
from xmask3d.engine import plots, tracking
from xmask3d.engine.checkpoint import save_checkpoint

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


@pytest.fixture
def mlflow_server(tmp_path):
    """A real tracking server (SQLite backend, proxied artifacts in tmp); stopped by pid."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"{uri}/health", proc, tmp_path / "server.log", timeout=90)
        yield uri
    finally:
        stop(proc)
        log.close()


def _fake_checkpoint(path: Path) -> Path:
    """A checkpoint file in the real format (tiny weights); registration does not load it."""
    return save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "step": 1, "preset": "tiny",
                                  "benchmark": "scannet20-b15n4"})


@pytest.mark.e2e
def test_run_artifacts_and_alias_on_real_server(mlflow_server, tmp_path):
    run = tracking.RunTracker(mlflow_server, "scannet20-b15n4", run_name="e2e")
    run.log_params({"train": {"lr_3d": 1e-3, "epochs": 2}, "protocol": {"views": "all"}})
    run.log_metrics({"loss/total": 1.5, "lr/3d": 1e-3}, step=0)
    run.log_metrics({"loss/total": 0.5, "lr/3d": 5e-4}, step=1)
    names = ["wall", "floor", "chair"]
    ious = {"fused": np.array([0.5, 0.25, np.nan])}
    bar = plots.iou_bar_chart(tmp_path / "art" / "iou.png", names, ious, [2], "test")
    run.log_artifact(bar, "plots")
    ckpt = _fake_checkpoint(tmp_path / "ckpt" / "last.pt")
    run.log_artifact(ckpt, "checkpoints")
    version = tracking.register_model(mlflow_server, run.run_id, "scannet20-b15n4", ckpt, hiou=0.3)
    assert tracking.promote_if_better(mlflow_server, "scannet20-b15n4", version, 0.3)
    run.end()

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["train.lr_3d"] == "0.001" and got.data.params["protocol.views"] == "all"
    history = client.get_metric_history(run.run_id, "loss/total")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 1.5), (1, 0.5)]
    listed = {a.path for a in client.list_artifacts(run.run_id, "plots")}
    assert listed == {"plots/iou.png"}
    downloaded = client.download_artifacts(run.run_id, "plots/iou.png", str(tmp_path / "dl"))
    assert Path(downloaded).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "server-artifacts").is_dir()  # stored through the server's proxy
    champion = client.get_model_version_by_alias("xmask3d-scannet20-b15n4", "champion")
    candidate = client.get_model_version_by_alias("xmask3d-scannet20-b15n4", "candidate")
    assert str(champion.version) == str(candidate.version) == version
    assert champion.run_id == run.run_id


def test_promote_only_when_hiou_beats_champion(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    versions = []
    for hiou in (0.4, 0.3, 0.5):
        run = tracking.RunTracker(uri, "s3dis-b8n4")
        ckpt = _fake_checkpoint(tmp_path / run.run_id / "last.pt")
        version = tracking.register_model(uri, run.run_id, "s3dis-b8n4", ckpt, hiou=hiou)
        versions.append((version, tracking.promote_if_better(uri, "s3dis-b8n4", version, hiou)))
        run.end()
    assert [moved for _, moved in versions] == [True, False, True]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("xmask3d-s3dis-b8n4", "champion")
    assert str(champion.version) == versions[2][0]
    assert str(client.get_model_version_by_alias("xmask3d-s3dis-b8n4", "candidate").version) == versions[2][0]
    assert tracking.promote_if_better(uri, "s3dis-b8n4", versions[1][0], float("nan")) is False
    # artifacts of a SQLite backend go beside the database, never to ./mlruns
    assert (tmp_path / "mlartifacts").is_dir()


def test_server_down_is_input_error():
    port = free_port()
    with pytest.raises(InputError, match="not reachable"):
        tracking.RunTracker(f"http://127.0.0.1:{port}", "scannet20-b15n4")


def test_uri_resolution_and_flatten(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == "sqlite:///mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking.resolve_tracking_uri() == "http://example:5000"
    assert tracking.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert tracking.flatten_params({"a": {"b": 1, "c": [1, 2]}}) == {"a.b": "1", "a.c": "[1, 2]"}
    with pytest.raises(InputError, match="does not exist"):
        tracking.check_tracking_available(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
