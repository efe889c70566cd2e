"""An interrupted training run in MLflow: never left RUNNING when it can be helped, and a resumed run
logs each step of each metric once; `xmask3d train` resumed after SIGTERM and SIGKILL ends with the
weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.servers import stop
from xmask3d.engine.checkpoint import load_checkpoint
from xmask3d.engine.tracking import RunTracker

BENCH = "scannet20-b15n4"


def test_resumed_run_skips_steps_its_killed_attempt_logged(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = RunTracker(uri, BENCH)
    for step in (1, 2, 3):  # the killed attempt logged step 3 after its last checkpoint (step 2)
        first.log_metrics({"loss/loss": 1.0 / step, "lr/3d": 0.1}, step)
    resumed = RunTracker(uri, BENCH, run_id=first.run_id)
    for step in (3, 4):
        resumed.log_metrics({"loss/loss": 1.0 / step, "lr/3d": 0.1, "grad_norm": 2.0}, step)
    resumed.log_metrics({"eval/miou": 0.5}, 4)
    client = MlflowClient(tracking_uri=uri)
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "loss/loss")) == [1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "lr/3d")) == [1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "grad_norm")) == [3, 4]
    assert [m.step for m in client.get_metric_history(first.run_id, "eval/miou")] == [4]
    tags = client.get_run(first.run_id).data.tags
    assert tags["resume.count"] == "1" and tags["resume.1.previous_status"] == "RUNNING"


def _wait_for_checkpoint(proc: subprocess.Popen, directory: Path, min_step: int) -> Path:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list(directory.glob("*/last.pt"))
        if found and load_checkpoint(found[0])["step"] >= min_step:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint at step >= {min_step} before the process ended")


def _interrupt_and_resume(common: list[str], out: Path, cwd: Path, env: dict[str, str],
                          client: MlflowClient) -> dict:
    """SIGTERM at a checkpoint >= 2, SIGKILL of the resumed attempt at >= 4, a resume to the end (8
    steps); checks the run's MLflow record at each stage; returns the final checkpoint."""

    def attempt(extra: list[str], min_step: int, sig: signal.Signals) -> tuple[Path, int]:
        proc = subprocess.Popen(common + ["--checkpoint-dir", str(out)] + extra, cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ckpt = _wait_for_checkpoint(proc, out, min_step)
            os.kill(proc.pid, sig)
        finally:
            proc.wait(timeout=300)
        return ckpt, proc.returncode

    ckpt, code = attempt([], 2, signal.SIGTERM)
    run_id = ckpt.parent.name
    assert code == 128 + signal.SIGTERM
    assert client.get_run(run_id).info.status == "KILLED"
    ckpt, code = attempt(["--resume", run_id], 4, signal.SIGKILL)
    assert ckpt.parent.name == run_id and code == -signal.SIGKILL
    assert 4 <= load_checkpoint(ckpt)["step"] < 8  # killed mid-training; its last checkpoint is whole
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing can run after SIGKILL
    done = subprocess.run(common + ["--checkpoint-dir", str(out), "--resume", run_id], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"MLflow run {run_id}" in done.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resume.1.previous_status"] == "KILLED"
    assert run.data.tags["resume.2.previous_status"] == "RUNNING"  # the SIGKILLed attempt, recorded
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), key  # no step logged twice across the attempts
        if key.startswith(("loss/", "lr/")):  # logged every step (log_every 1): each step once
            assert sorted(steps) == list(range(1, 9)), key
    resumed = load_checkpoint(ckpt)
    assert resumed["step"] == 8
    return resumed


@pytest.mark.slow
def test_sigterm_and_sigkill_then_resume_track_the_run_and_end_with_the_uninterrupted_weights(
        synthetic_store, tmp_path):
    """One interrupted `xmask3d train` run (SIGTERM, then SIGKILL during its resume, then a resume
    to the end) against one straight run: MLflow statuses, the resume tags, each step of each metric
    logged once, and the final weights bit-equal to the straight run's."""
    xmask3d = str(Path(sys.executable).with_name("xmask3d"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "ckpt"
    common = [xmask3d, "train", "--store", str(synthetic_store), "--benchmark", BENCH, "--preset", "tiny",
              "--max-steps", "8", "--checkpoint-every", "1", "--no-evaluate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    client = MlflowClient(tracking_uri=uri)
    # the uninterrupted reference (own MLflow database and checkpoints) runs meanwhile, on the other core
    straight_log = tmp_path / "straight.log"
    with open(straight_log, "wb") as log:
        straight = subprocess.Popen(common + ["--tracking-uri", f"sqlite:///{tmp_path / 'straight.db'}",
                                              "--checkpoint-dir", str(tmp_path / "straight")],
                                    cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        resumed = _interrupt_and_resume(common + ["--tracking-uri", uri], out, tmp_path, env, client)
        straight.wait(timeout=600)
    finally:
        stop(straight)
    assert straight.returncode == 0, straight_log.read_text(errors="replace")[-3000:]
    reference = load_checkpoint(next((tmp_path / "straight").glob("*/last.pt")))
    for name, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
