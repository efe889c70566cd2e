"""Object storage end to end against a real S3-compatible server (moto, started by the test session).

The store in a bucket: scenes preprocessed into ``s3://`` equal a local run array for array; a
scene whose writer was killed (SIGKILL) mid-scene is never listed, and the rerun completes it;
two writers of one scene cannot both commit. MLflow: an `mlflow server` whose artifact
destination is a bucket; `xmask3d train --store s3://...` logs its checkpoint and evaluation
artifacts through the server, and they land as objects in the bucket.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from preprocessing.pipeline import PreprocessConfig, prepare_store, preprocess_scannet_scene
from storage.lease import LeaseHeldError
from storage.objects import ObjectPath, as_path
from storage.schema import ARRAYS
from storage.store import create_store, open_store
from tests.servers import free_port, stop, tail, wait_healthy

BIN = Path(sys.executable).parent
MLFLOW = str(BIN / "mlflow")
XMASK3D = str(BIN / "xmask3d")


SCENES = ("scene0000_00", "scene0002_00")  # one train, one val scene of the synthetic raw data


def _config(raw: Path) -> PreprocessConfig:
    """The settings of the ``synthetic_store`` fixture (so its scenes are the local reference)."""
    return PreprocessConfig(captions=raw / "captions.json", text_encoder="minilm",
                            region_captions=raw / "region_captions.json", show_progress=False)


def _preprocess(raw: Path, store: str, scenes=SCENES) -> list[str]:
    listing, cfg = prepare_store("scannet", raw, store, _config(raw), scenes)
    return [preprocess_scannet_scene(raw, sid, store, cfg, split).status for sid, split in listing.items()]


def _assert_same_scene(local, remote) -> None:
    names = [n for n in ARRAYS if n in local]
    assert names and names == [n for n in ARRAYS if n in remote]
    for name in names:
        a, b = local[name][...], remote[name][...]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name in ("captions/clip", "captions/region_clip"):
            # embedded in other batches (per scene vs once per run): equal up to float16 rounding
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=0, atol=1e-4,
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)  # same code, same input: bit-equal
    drop = {"write_token", "fingerprint"}  # per write / absolute source paths
    assert {k: v for k, v in local.attrs.items() if k not in drop} == \
        {k: v for k, v in remote.attrs.items() if k not in drop}


def test_preprocess_into_s3_equals_local_run(synthetic_scannet, synthetic_store, s3_bucket):
    url = s3_bucket.url("data", "scannet.zarr")
    assert _preprocess(Path(synthetic_scannet), url) == ["written", "written"]
    keys = s3_bucket.keys("data/scannet.zarr/")
    assert "data/scannet.zarr/zarr.json" in keys
    assert "data/scannet.zarr/scenes/scene0000_00/frames/color/c/0/0/0/0" in keys  # one shard per scene
    assert not [k for k in keys if "/.claim-" in k or "/.new-" in k]  # claims released, nothing left over
    remote, local = open_store(url), open_store(synthetic_store)
    assert isinstance(remote.path, ObjectPath)
    assert remote.attrs == local.attrs
    assert remote.scene_ids() == list(SCENES) and remote.scene_ids("val") == ["scene0002_00"]
    for sid in SCENES:
        _assert_same_scene(local.scene(sid), remote.scene(sid))
    # a rerun skips the complete scenes (their fingerprint matches)
    assert _preprocess(Path(synthetic_scannet), url) == ["skipped", "skipped"]


# a writer that stops after its first frames and waits to be killed
HALF_WRITER = """
import sys, time
from pathlib import Path
from storage.store import SceneWriter
from preprocessing.pipeline import PreprocessConfig, prepare_store, preprocess_scannet_scene
raw, store, scene, ready = sys.argv[1:5]
added = SceneWriter.add_frame
def add_then_wait(self, *args, **kwargs):
    added(self, *args, **kwargs)
    if self._frames["count"] == 2:
        self._flush_frames()
        Path(ready).write_text("ready")
        time.sleep(600)
SceneWriter.add_frame = add_then_wait
cfg = PreprocessConfig(captions=Path(raw) / "captions.json", text_encoder="minilm",
                       region_captions=Path(raw) / "region_captions.json", show_progress=False)
listing, cfg = prepare_store("scannet", Path(raw), store, cfg, [scene])
preprocess_scannet_scene(Path(raw), scene, store, cfg, listing[scene])
"""


@pytest.mark.slow
def test_killed_writer_leaves_no_listed_scene_and_the_rerun_completes(synthetic_scannet, synthetic_store,
                                                                     s3_bucket, tmp_path):
    url = s3_bucket.url("killed.zarr")
    sid = "scene0000_00"
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", HALF_WRITER, str(synthetic_scannet), url, sid, str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the writer never reached its second frame"
            time.sleep(0.2)
        written = s3_bucket.keys(f"killed.zarr/scenes/{sid}/")
        assert f"killed.zarr/scenes/{sid}/points/xyz/zarr.json" in written  # arrays are in the bucket
        assert f"killed.zarr/scenes/.claim-{sid}" in s3_bucket.keys("killed.zarr/scenes/.claim-")
        store = open_store(url, mode="r+")
        assert store.scene_ids() == [] and not store.is_complete(sid)  # ... but no scene is listed
        with pytest.raises(LeaseHeldError, match=f"scene {sid} is held by pid {proc.pid}"):
            with store.writer(sid):  # a second writer cannot take the scene while the first lives
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    assert open_store(url).scene_ids() == []  # the dead writer's half scene is still not a scene
    assert _preprocess(Path(synthetic_scannet), url, [sid]) == ["written"]  # claim of a dead pid is broken
    store = open_store(url)
    assert store.scene_ids() == [sid]
    _assert_same_scene(open_store(synthetic_store).scene(sid), store.scene(sid))
    assert not [k for k in s3_bucket.keys("killed.zarr/scenes/") if "/.claim-" in k or "/.new-" in k]


def test_store_urls_refuse_bad_input_with_one_line(s3_bucket):
    from storage.errors import InputError

    with pytest.raises(InputError, match="no Zarr store here"):
        open_store(s3_bucket.url("absent.zarr"))
    create_store(s3_bucket.url("a.zarr"), "scannet", "minilm", 384)
    with pytest.raises(InputError, match="holds dataset 'scannet', not 's3dis'"):
        create_store(s3_bucket.url("a.zarr"), "s3dis", "minilm", 384)
    with pytest.raises(InputError, match="refused"):
        open_store("s3://KEY:SECRET@" + s3_bucket.name + "/a.zarr")
    assert str(as_path(s3_bucket.url("a.zarr"))) == s3_bucket.url("a.zarr")


@pytest.mark.slow
def test_cli_preprocess_flow_writes_into_the_bucket(synthetic_scannet, synthetic_store, s3_bucket, tmp_path):
    """`xmask3d preprocess scannet --out s3://...` through the Prefect flow, on a Dask cluster named
    by its class path and keyword arguments (the code path of dask_jobqueue.SLURMCluster)."""
    url = s3_bucket.url("cli", "scannet.zarr")
    raw = ["--raw", str(synthetic_scannet)]
    # bad input is refused before anything is written: checked side by side with the real run
    refused = {
        "credentials": [*raw, "--out", f"s3://AKIAKEY:hunter2secret@{s3_bucket.name}/x.zarr"],
        "class": [*raw, "--out", s3_bucket.url("noclass.zarr"),
                  "--cluster-class", "dask_jobqueue.NoSuchCluster"],
    }
    procs = {name: subprocess.Popen([XMASK3D, "preprocess", "scannet", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
             for name, args in refused.items()}
    kwargs = '{"n_workers": 1, "threads_per_worker": 1, "processes": true, "dashboard_address": null}'
    try:
        done = subprocess.run([XMASK3D, "preprocess", "scannet", *raw, "--out", url,
                               "--scenes", "scene0000_00", "--cluster-class", "distributed.LocalCluster",
                               "--cluster-kwargs", kwargs],
                              capture_output=True, text=True, cwd=tmp_path, timeout=600)
        output = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            stop(proc)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 written, 0 skipped, 0 failed" in done.stdout
    store = open_store(url)
    assert store.scene_ids() == ["scene0000_00"]
    _assert_same_scene(open_store(synthetic_store).scene("scene0000_00"), store.scene("scene0000_00"))
    assert procs["credentials"].returncode == 2 and "refused" in output["credentials"]
    assert "hunter2secret" not in output["credentials"]
    assert procs["class"].returncode == 2 and "not a Dask cluster class" in output["class"]
    assert not s3_bucket.keys("x.zarr") and not s3_bucket.keys("noclass.zarr")


@pytest.fixture
def dask_cluster(tmp_path):
    """A real `dask scheduler` and two single-threaded `dask worker` processes (no nanny, so the
    pid a scene claim records is the worker process the test started); stopped by pid."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: dict[str, subprocess.Popen] = {}
    logs = []
    try:
        log = open(tmp_path / "scheduler.log", "wb")  # noqa: SIM115 - closed in teardown
        logs.append(log)
        procs["scheduler"] = subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for i in range(2):
            log = open(tmp_path / f"worker{i}.log", "wb")  # noqa: SIM115 - closed in teardown
            logs.append(log)
            procs[f"worker{i}"] = subprocess.Popen(
                [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                 "--name", f"worker{i}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"})
        with Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=180)
        yield address, procs
    finally:
        for proc in procs.values():
            stop(proc)
        for log in logs:
            log.close()


@pytest.mark.slow
def test_dask_workers_write_into_the_bucket_and_a_killed_worker_is_survived(
        synthetic_scannet, synthetic_store, s3_bucket, dask_cluster):
    """2 worker processes preprocess 2 scenes straight into s3://; one worker is SIGKILLed while
    it writes its scene; no half scene is ever listed; the run (and a rerun) completes every scene
    and the arrays equal the local run."""
    from preprocessing.run import run_preprocess
    from storage.lease import read_owner

    address, procs = dask_cluster
    url = s3_bucket.url("dask.zarr")
    raw = Path(synthetic_scannet)
    worker_pids = {procs["worker0"].pid, procs["worker1"].pid}
    import threading

    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(
        summaries=run_preprocess("scannet", raw, url, _config(raw), SCENES, dask_address=address)))
    runner.start()
    killed, listed = None, set()
    deadline = time.monotonic() + 400
    while runner.is_alive() and time.monotonic() < deadline:
        keys = set(s3_bucket.keys("dask.zarr/scenes/"))
        if killed is None:
            for sid in SCENES:
                claim = f"dask.zarr/scenes/.claim-{sid}"
                if claim in keys and f"dask.zarr/scenes/{sid}/points/xyz/zarr.json" in keys:
                    owner = read_owner(as_path(s3_bucket.url(claim)))
                    if owner is not None and owner.pid in worker_pids:
                        os.kill(owner.pid, signal.SIGKILL)  # a worker process this test started
                        killed = (sid, owner.pid)
                        break
        if "dask.zarr/zarr.json" in keys:
            store = open_store(url)
            for sid in store.scene_ids():  # whatever is listed is whole
                listed.add(sid)
                _assert_same_scene(open_store(synthetic_store).scene(sid), store.scene(sid))
        time.sleep(0.2)
    runner.join(timeout=60)
    assert killed is not None, "no worker was caught writing a scene"
    statuses = {s.scene_id: s.status for s in result["summaries"]}
    # the killed worker's task either moved to the other worker (written) or failed (KilledWorker)
    assert set(statuses) == set(SCENES) and all(v in ("written", "failed") for v in statuses.values())
    rerun = {s.scene_id: s.status for s in run_preprocess("scannet", raw, url, _config(raw), SCENES,
                                                          dask_address=address)}
    assert all(rerun[sid] == ("skipped" if statuses[sid] == "written" else "written") for sid in SCENES)
    store = open_store(url)
    assert store.scene_ids() == sorted(SCENES)
    for sid in SCENES:
        _assert_same_scene(open_store(synthetic_store).scene(sid), store.scene(sid))
    assert not [k for k in s3_bucket.keys("dask.zarr/scenes/") if "/.claim-" in k or "/.new-" in k]


@pytest.fixture
def mlflow_s3_server(s3_bucket, tmp_path):
    """A real tracking server (SQLite backend) that stores artifacts in ``s3://<bucket>/mlartifacts``."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "mlflow-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", s3_bucket.url("mlartifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy())
    try:
        wait_healthy(f"{uri}/health", proc, log_path, timeout=120)
        yield uri, log_path
    finally:
        stop(proc)


def _upload(store: Path, bucket, prefix: str) -> str:
    """Copy a local store into the bucket object by object (a store's files are its objects)."""
    client = bucket.client()
    for path in sorted(store.rglob("*")):
        if path.is_file() and not path.name.startswith(".writer.lock"):
            client.upload_file(str(path), bucket.name, f"{prefix}/{path.relative_to(store).as_posix()}")
    return bucket.url(prefix)


@pytest.mark.e2e
@pytest.mark.slow
def test_train_from_a_bucket_logs_artifacts_to_the_bucket(synthetic_store, mlflow_s3_server, s3_bucket,
                                                          tmp_path):
    uri, server_log = mlflow_s3_server
    store_url = _upload(Path(synthetic_store), s3_bucket, "stores/scannet.zarr")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # with the S3 environment: the store is read from the bucket
    done = subprocess.run(
        [XMASK3D, "train", "--store", store_url, "--benchmark", "scannet20-b15n4",
         "--preset", "tiny", "--max-steps", "2", "--tracking-uri", uri,
         "--checkpoint-dir", str(tmp_path / "ckpt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + tail(server_log)
    keys = s3_bucket.keys("mlartifacts/")
    assert any(k.endswith("/artifacts/checkpoints/last.pt") for k in keys), keys
    assert any("/artifacts/evaluation/panels/" in k and k.endswith(".png") for k in keys), keys
    assert any("/artifacts/evaluation/ply/" in k and k.endswith(".ply") for k in keys), keys
    body = s3_bucket.client().get_object(Bucket=s3_bucket.name,
                                         Key=next(k for k in keys if k.endswith("checkpoints/last.pt")))
    assert body["ContentLength"] > 10_000  # the tiny model's weights, not an empty object
    assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / "mlruns").exists()
    assert "MLflow run" in done.stdout and "xmask3d-test-secret" not in done.stdout + done.stderr
    from mlflow import MlflowClient

    run_id = done.stdout.split("MLflow run ")[1].split(";")[0]
    assert MlflowClient(tracking_uri=uri).get_run(run_id).data.params["data.store"] == store_url
