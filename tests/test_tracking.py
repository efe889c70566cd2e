"""MLflow tracking: a real `mlflow server` (e2e) and temp-SQLite tests of params, aliases, errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
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
    assert tracking.promote_if_better(mlflow_server, "scannet20-b15n4", version, _metrics(0.3)).promoted
    run.end()
    # the registered checkpoint comes back through the server's artifact proxy, by alias
    got_ckpt, got_run = tracking.resolve_model("models:/xmask3d-scannet20-b15n4@champion", mlflow_server,
                                               tmp_path / "resolved")
    assert got_ckpt.read_bytes() == ckpt.read_bytes() and got_run == run.run_id

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
    assert float(champion.tags["hiou"]) == pytest.approx(30.0)  # percent, as the eval/* metrics
    assert champion.tags["unit"] == "percent"
    model_id = re.search(r"/models/(m-[0-9a-f]+)/", champion.source).group(1)
    logged = client.get_logged_model(model_id)  # the model page shows the run's parameters
    assert logged.source_run_id == run.run_id and logged.params["train.lr_3d"] == "0.001"


def _metrics(hiou: float, miou_all: float = 0.2, novel: bool = True, baseline_all: float = 0.05) -> dict:
    """Evaluation metrics as xmask3d.engine.evaluate writes them: fused head and majority-class baseline."""
    return {"fused/hiou": hiou if novel else float("nan"), "fused/miou_all": miou_all,
            "fused/miou_base": 0.3, "fused/miou_novel": 0.1 if novel else float("nan"),
            "baseline/hiou": 0.0 if novel else float("nan"), "baseline/miou_all": baseline_all,
            "baseline/miou_base": 0.06, "baseline/miou_novel": 0.0 if novel else float("nan")}


def test_primary_metric_is_hiou_only_with_novel_classes_in_the_evaluation():
    assert tracking.primary_metric(_metrics(0.3)) == "fused/hiou"
    assert tracking.primary_metric(_metrics(0.3, novel=False)) == "fused/miou_all"


def _percent(metrics: dict) -> dict:
    return {k: 100 * v for k, v in metrics.items()}


@pytest.mark.parametrize(("metrics", "champion", "promoted", "reason"), [
    (_metrics(0.3), None, True, "no champion yet"),
    (_metrics(float("nan")), None, False, "not finite: fused/hiou=nan"),
    (_metrics(0.3, miou_all=float("inf")), None, False, "not finite: fused/miou_all=inf"),
    # mIoU over all classes 0.0 against a 4.1 % majority-class baseline: never promoted
    (_metrics(0.0, miou_all=0.0, baseline_all=0.041), None, False, "not above the majority-class baseline"),
    (_metrics(0.3, miou_all=0.04, baseline_all=0.041), None, False, "fused/miou_all 4.00 % <= 4.10 %"),
    (_metrics(0.0), None, True, "no champion yet"),  # hIoU 0 (the baseline's, by construction) but above it
    (_metrics(0.0), {"fused/hiou": "0.0"}, False, "not better than champion version 1: fused/hiou 0.00 % <="),
    (_metrics(0.3), {"fused/hiou": "40.0"}, False, "not better than champion version 1: fused/hiou"),
    (_metrics(0.25), {"fused/hiou": "25.0"}, False, "not better than champion version 1"),
    (_metrics(0.5), {"fused/hiou": "40.0"}, True, "beats champion version 1: fused/hiou 50.00 % > 40.00 %"),
    (_metrics(0.5), {"fused/hiou": "nan"}, True, "champion version 1 has no finite fused/hiou"),
    # no novel classes in the evaluation set: judged by mIoU over all classes
    (_metrics(0.0, miou_all=0.3, novel=False), {"fused/miou_all": "25.0"}, True, "fused/miou_all 30.00 % >"),
    (_metrics(0.0, miou_all=0.2, novel=False), {"fused/miou_all": "25.0"}, False,
     "fused/miou_all 20.00 % <="),
    ({"fused/hiou": 0.3, "fused/miou_all": 0.2}, None, False, "no majority-class baseline/miou_all"),
])
def test_promotion_verdict(metrics, champion, promoted, reason):
    """Scores in percent on both sides: the evaluation's and the champion's recorded tags."""
    got, _, why = tracking.promotion_verdict(_percent(metrics), champion, "1" if champion else None)
    assert got is promoted
    assert reason in why


def _register(uri: str, tmp_path: Path, benchmark: str) -> str:
    run = tracking.RunTracker(uri, benchmark)
    ckpt = _fake_checkpoint(tmp_path / run.run_id / "last.pt")
    version = tracking.register_model(uri, run.run_id, benchmark, ckpt)
    run.end()
    return version


def test_promotion_moves_champion_and_tags_why(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bench, name = "s3dis-b8n4", "xmask3d-s3dis-b8n4"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    outcomes = []
    for metrics in (_metrics(0.0, miou_all=0.0), _metrics(0.4), _metrics(0.3), _metrics(0.5)):
        version = _register(uri, tmp_path, bench)
        outcomes.append(tracking.promote_if_better(uri, bench, version, metrics))
    assert [o.promoted for o in outcomes] == [False, True, False, True]
    assert "no champion yet" in outcomes[1].reason  # the first version never was champion
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == outcomes[3].version
    assert str(client.get_model_version_by_alias(name, "candidate").version) == outcomes[3].version
    worse = client.get_model_version(name, outcomes[2].version)
    assert worse.tags["promotion"] == "candidate"
    assert worse.tags["promotion.metric"] == "fused/hiou"
    assert "not better than champion version 2" in worse.tags["promotion.reason"]
    below = client.get_model_version(name, outcomes[0].version)
    assert "majority-class baseline" in below.tags["promotion.reason"]
    run_tags = client.get_run(worse.run_id).data.tags  # stated on the training run too
    assert run_tags["promotion"] == "candidate" and run_tags["promotion.metric"] == "fused/hiou"
    assert client.get_model_version(name, outcomes[3].version).tags["promotion"] == "champion"
    # artifacts of a SQLite backend go beside the database, never to ./mlruns
    assert (tmp_path / "mlartifacts").is_dir()


def test_champion_or_newest_falls_back_with_a_reason(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bench, model = "s3dis-b6n6", "models:/xmask3d-s3dis-b6n6@champion"
    with pytest.raises(InputError, match="no MLflow database"):
        tracking.champion_or_newest(uri, model)
    assert not (tmp_path / "mlflow.db").exists()  # looking did not create one
    first = _register(uri, tmp_path, bench)
    tracking.promote_if_better(uri, bench, first, _metrics(0.0, miou_all=0.0))
    second = _register(uri, tmp_path, bench)
    tracking.promote_if_better(uri, bench, second, _metrics(float("nan")))
    chosen, note = tracking.champion_or_newest(uri, model)
    assert chosen == f"models:/xmask3d-s3dis-b6n6/{second}"
    assert note.startswith("no champion for xmask3d-s3dis-b6n6: evaluating the newest version")
    assert "not finite" in note
    tracking.promote_if_better(uri, bench, _register(uri, tmp_path, bench), _metrics(0.3))
    assert tracking.champion_or_newest(uri, model) == (model, None)
    pinned = "models:/xmask3d-s3dis-b6n6/1"
    assert tracking.champion_or_newest(uri, pinned) == (pinned, None)
    with pytest.raises(InputError, match="no version of xmask3d-s3dis-b8n4"):
        tracking.champion_or_newest(uri, "models:/xmask3d-s3dis-b8n4@champion")


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


def test_version_tags_are_percent_and_an_old_fraction_champion_is_compared_on_the_same_scale(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bench, name = "s3dis-b6n6", "xmask3d-s3dis-b6n6"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # a champion registered before the tags were in percent: fractions and no `unit` tag
    old = _register(uri, tmp_path, bench)
    for key, value in {"fused/hiou": "0.4", "fused/miou_all": "0.3", "hiou": "0.4"}.items():
        client.set_model_version_tag(name, old, key, value)
    client.set_registered_model_alias(name, "champion", old)

    worse = tracking.promote_if_better(uri, bench, _register(uri, tmp_path, bench), _metrics(0.3))
    assert not worse.promoted  # 30 % against the old champion's 0.4 (= 40 %)
    assert "fused/hiou 30.00 % <= 40.00 %" in worse.reason
    tags = client.get_model_version(name, worse.version).tags
    assert tags["unit"] == "percent"
    assert float(tags["hiou"]) == pytest.approx(30.0) and float(tags["fused/hiou"]) == pytest.approx(30.0)
    assert float(tags["fused/miou_all"]) == pytest.approx(20.0)
    assert float(tags["baseline/miou_all"]) == pytest.approx(5.0)
    assert float(tags["promotion.value"]) == pytest.approx(30.0)
    assert worse.value == pytest.approx(0.3)  # the Python API keeps fractions

    better = tracking.promote_if_better(uri, bench, _register(uri, tmp_path, bench), _metrics(0.5))
    assert better.promoted and "fused/hiou 50.00 % > 40.00 %" in better.reason
    # the new champion's percent tags are read as percent: 45 % does not beat 50 %
    close = tracking.promote_if_better(uri, bench, _register(uri, tmp_path, bench), _metrics(0.45))
    assert not close.promoted
    assert str(client.get_model_version_by_alias(name, "champion").version) == better.version


def test_register_and_resolve_leave_the_process_mlflow_state_alone(tmp_path, monkeypatch):
    """Registering into store A, then resolving from it, sets no process-wide URI (neither
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI nor mlflow's module state): a later run of the same
    process (a Prefect worker, a notebook) or its subprocesses would otherwise log into A."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    env_before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    uris_before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    store_a, store_b = (f"sqlite:///{tmp_path / d / 'mlflow.db'}" for d in ("a", "b"))
    bench, name = "scannet20-b12n7", "xmask3d-scannet20-b12n7"

    version_a = _register(store_a, tmp_path, bench)
    ckpt, run_a = tracking.resolve_model(f"models:/{name}@candidate", store_a, tmp_path / "dl-a")
    assert ckpt.is_file() and run_a is not None
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")} == env_before
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == uris_before

    # a second registration into B lands in B, even with the environment naming A
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_a)
    version_b = _register(store_b, tmp_path, bench)
    client_a = MlflowClient(tracking_uri=store_a, registry_uri=store_a)
    client_b = MlflowClient(tracking_uri=store_b, registry_uri=store_b)
    assert [str(v.version) for v in client_a.search_model_versions(f"name = '{name}'")] == [version_a]
    in_b = client_b.get_model_version(name, version_b)
    assert client_b.get_run(in_b.run_id).info.run_id != run_a  # B's own training run
    _, run_b = tracking.resolve_model(f"models:/{name}/{version_b}", store_b, tmp_path / "dl-b")
    assert run_b == in_b.run_id
    assert os.environ["MLFLOW_TRACKING_URI"] == store_a  # what the caller set stays as it was
    assert (tmp_path / "b" / "mlartifacts").is_dir()
