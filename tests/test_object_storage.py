"""Object storage end to end against a real S3-compatible server (moto, started by the test session).

MLflow: an `mlflow server` whose artifact destination is a bucket; `xmask3d train` logs its
checkpoint and evaluation artifacts through the server, and they land as objects in the bucket.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import free_port, stop, tail, wait_healthy

BIN = Path(sys.executable).parent
MLFLOW = str(BIN / "mlflow")
XMASK3D = str(BIN / "xmask3d")


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


@pytest.mark.e2e
@pytest.mark.slow
def test_train_logs_artifacts_to_the_bucket(synthetic_store, mlflow_s3_server, s3_bucket, tmp_path):
    uri, server_log = mlflow_s3_server
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the client has no S3 credentials: the server proxies every artifact upload
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        env.pop(key)
    done = subprocess.run(
        [XMASK3D, "train", "--store", str(synthetic_store), "--benchmark", "scannet20-b15n4",
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
