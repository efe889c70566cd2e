"""Training loop mechanics (resume bit-for-bit, SIGKILL + resume, DDP sync, schedule, presets).

The mechanics tests use a small torch module of their own (with dropout, so the RNG state
matters) because they are about the loop, not the model; the XMask3D tests are further down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from storage.errors import InputError
from tests.servers import free_port
from xmask3d.engine.checkpoint import load_checkpoint
from xmask3d.engine.train import (
    DistInfo,
    TrainConfig,
    WarmupCosine,
    fit,
    init_distributed,
    seed_everything,
    train_preset,
)

REPO = Path(__file__).resolve().parents[1]


class RandomPoints(Dataset):
    """Item i of epoch e is drawn from a generator seeded by (seed, e, i), like SceneViewDataset."""

    def __init__(self, size: int = 6, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + i)
        x = torch.randn(4, 3, generator=g)
        return {"x": x, "y": x.sum(1, keepdim=True), "index": torch.tensor(i)}


def collate(samples: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a3d = nn.Linear(3, 8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 1)
        self.frozen = nn.Linear(1, 1).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.a3d(x))))


def loss_fn(model: nn.Module, batch: dict, epoch: int = 0) -> dict:
    pred = model(batch["x"])
    mse = ((pred - batch["y"]) ** 2).mean()
    return {"loss": mse + 0.0, "mse": mse}


def is_3d(name: str) -> bool:
    return name.startswith("a3d")


def _cfg(**kw) -> TrainConfig:
    base = dict(preset="tiny", epochs=3, loop=1, batch_size=2, lr_3d=1e-2, lr_other=1e-3, warmup_iters=2,
                grad_clip=1.0, checkpoint_every=0, num_workers=0, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def _run(tmp: Path, cfg: TrainConfig, resume=None, step_delay: float = 0.0) -> nn.Module:
    seed_everything(cfg.seed)
    model = TinyNet()
    fn = loss_fn
    if step_delay:
        def fn(m, b, e):  # noqa: E306 - slow steps so a kill lands mid-training
            time.sleep(step_delay)
            return loss_fn(m, b, e)
    fit(model, RandomPoints(6), collate, fn, cfg, is_3d=is_3d, checkpoint_dir=tmp,
        meta={"preset": "tiny", "benchmark": "toy"}, resume=resume)
    return model


def test_resume_is_bit_for_bit(tmp_path):
    straight = _run(tmp_path / "a", _cfg(max_steps=4))
    first = _run(tmp_path / "b", _cfg(max_steps=2, checkpoint_every=2))
    payload = load_checkpoint(tmp_path / "b")
    assert payload["step"] == 2 and payload["preset"] == "tiny" and payload["train_config"]["seed"] == 7
    resumed = _run(tmp_path / "b", _cfg(max_steps=4), resume=payload)  # crosses an epoch boundary
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # and resuming actually mattered: 2 steps differ from 4
    assert not torch.equal(first.state_dict()["a3d.weight"], straight.state_dict()["a3d.weight"])
    assert load_checkpoint(tmp_path / "b")["step"] == 4


def test_epoch_callback_and_plain_progress_lines(tmp_path, capsys, caplog):
    """After each epoch's checkpoint (and after the last step) the callback runs; with stderr not a
    terminal there is no bar and no carriage return, only log lines with loss, lr, step/s and ETA."""
    import logging

    calls = []

    def on_epoch_end(epoch, step, final):
        calls.append((epoch, step, final, load_checkpoint(tmp_path)["step"]))

    seed_everything(7)
    with caplog.at_level(logging.INFO, logger="test.fit"):
        fit(TinyNet(), RandomPoints(6), collate, loss_fn, _cfg(epochs=3, max_steps=8), is_3d=is_3d,
            checkpoint_dir=tmp_path, on_epoch_end=on_epoch_end, logger=logging.getLogger("test.fit"))
    # 3 steps per epoch; max_steps 8 ends inside the third epoch; the checkpoint is written first
    assert calls == [(0, 3, False, 3), (1, 6, False, 6), (2, 8, True, 8)]
    lines = [r.getMessage() for r in caplog.records if r.name == "test.fit"]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [e.split(":")[0] for e in epochs] == ["epoch 1/3 step 3/8", "epoch 2/3 step 6/8",
                                                 "epoch 3/3 step 8/8"]
    assert all("mean loss" in e and "lr 3d" in e and "step/s" in e and "ETA" in e for e in epochs)
    assert "\r" not in capsys.readouterr().err


def test_param_groups_and_schedule(tmp_path):
    cfg = _cfg(max_steps=1)
    seed_everything(0)
    model = TinyNet()
    logged: list[tuple[int, dict]] = []
    fit(model, RandomPoints(6), collate, loss_fn, cfg, is_3d=is_3d, checkpoint_dir=tmp_path,
        on_log=lambda values, step: logged.append((step, values)))
    payload = load_checkpoint(tmp_path)
    groups = payload["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["3d", "other"]
    assert [len(g["params"]) for g in groups] == [2, 2]  # the frozen Linear is left out
    step, values = logged[0]
    assert step == 1 and {"loss/loss", "loss/mse", "lr/3d", "lr/other", "grad_norm"} <= set(values)
    assert values["lr/3d"] == pytest.approx(1e-2 * 0.01)  # first warm-up step
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, total_steps=10, warmup_iters=0)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == 1.0 and lrs[5] == pytest.approx(0.5) and opt.param_groups[0]["lr"] == 0.0


def test_presets():
    paper = train_preset("paper")
    assert (paper.epochs, paper.loop, paper.batch_size) == (150, 16, 16)
    assert (paper.warmup_iters, paper.grad_clip, paper.amp) == (0, 0, False)
    assert (paper.lr_3d, paper.lr_other, paper.weight_decay, paper.seed) == (1e-3, 1e-4, 0.01, 5557)
    assert train_preset("tiny", epochs=1).epochs == 1
    with pytest.raises(InputError, match="unknown training preset"):
        train_preset("huge")
    with pytest.raises(InputError, match="unknown TrainConfig"):
        train_preset("tiny", epocs=1)


def _kill_target(out: str) -> None:
    """Run in a subprocess: 6 slow steps with a checkpoint after every step."""
    _run(Path(out), _cfg(max_steps=6, checkpoint_every=1), step_delay=0.4)


def test_sigkill_then_resume(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c",
                             f"from tests.test_train import _kill_target; _kill_target({str(out)!r})"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (out / "last.pt").is_file() and load_checkpoint(out)["step"] >= 2:
                break
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    payload = load_checkpoint(out)  # the last complete checkpoint, never a torn file
    assert 2 <= payload["step"] < 6
    assert not [p for p in out.iterdir() if p.name != "last.pt"]  # no temp files left behind
    resumed = _run(out, _cfg(max_steps=6, checkpoint_every=1), resume=payload)
    straight = _run(tmp_path / "straight", _cfg(max_steps=6))
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed()
    assert info.world_size == world and info.rank == rank
    seed_everything(100 + rank)  # different init per rank: DDP must broadcast rank 0's weights
    model = TinyNet()
    seen: list[int] = []

    def fn(m, batch, epoch):
        seen.extend(batch["index"].tolist())
        return loss_fn(m, batch, epoch)

    fit(model, RandomPoints(8), collate, fn, _cfg(max_steps=2, epochs=1), is_3d=is_3d,
        checkpoint_dir=Path(out), info=DistInfo(rank=rank, world_size=world))
    torch.save({"state": model.state_dict(), "seen": seen}, Path(out) / f"rank{rank}.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


def test_ddp_two_gloo_ranks_stay_identical(tmp_path):
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert set(r0["seen"]).isdisjoint(r1["seen"])  # each rank trained on its own samples
    for name, a in r0["state"].items():
        assert torch.equal(a, r1["state"][name]), name
    seed_everything(100)
    assert not torch.equal(TinyNet().a3d.weight, r0["state"]["a3d.weight"])  # and it did train
    assert load_checkpoint(tmp_path)["step"] == 2  # rank 0 wrote the checkpoint


# --------------------------------------------------------------------------------------------
# XMask3D training (the real model on the synthetic store)

BENCH = "scannet20-b15n4"


def _copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _no_fit(*args, **kwargs):
    raise AssertionError("training started although the input is bad")


def test_bad_inputs_fail_before_training(synthetic_store, tmp_path, monkeypatch):
    import zarr

    from xmask3d.engine import train as train_mod
    from xmask3d.engine.checkpoint import save_checkpoint

    monkeypatch.setattr(train_mod, "fit", _no_fit)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = train_preset("tiny", checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(InputError, match="unknown benchmark"):
        train_mod.train(synthetic_store, "scannet20-b99n1", "tiny", cfg, tracking_uri=uri)
    with pytest.raises(InputError, match="needs 's3dis'"):
        train_mod.train(synthetic_store, "s3dis-b8n4", "tiny", cfg, tracking_uri=uri)
    port = free_port()
    with pytest.raises(InputError, match="not reachable"):
        train_mod.train(synthetic_store, BENCH, "tiny", cfg, tracking_uri=f"http://127.0.0.1:{port}")
    with pytest.raises(InputError, match="not 'tiny'"):
        train_mod.train(synthetic_store, BENCH, "tiny", train_preset("small"), tracking_uri=uri)

    other = save_checkpoint(tmp_path / "other" / "last.pt",
                            {"model": {}, "preset": "small", "benchmark": BENCH})
    with pytest.raises(InputError, match="preset 'small'"):
        train_mod.train(synthetic_store, BENCH, "tiny", cfg, tracking_uri=uri, resume=other)

    no_labels = _copy_store(synthetic_store, tmp_path / "no_labels.zarr")
    scene = sorted((no_labels / "scenes").iterdir())[0]
    import shutil

    shutil.rmtree(scene / "points" / "nyu40")
    with pytest.raises(InputError, match="no points/nyu40 labels"):
        train_mod.train(no_labels, BENCH, "tiny", cfg, tracking_uri=uri)

    other_text = _copy_store(synthetic_store, tmp_path / "other_text.zarr")
    zarr.open_group(other_text, mode="r+").attrs.update({"text_encoder": "openclip-tiny", "text_dim": 64})
    with pytest.raises(InputError, match="embedded with openclip-tiny"):
        train_mod.train(other_text, BENCH, "tiny", cfg, tracking_uri=uri)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_train_tiny_logs_registers_and_resumes(synthetic_store, tmp_path):
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from storage.store import open_store
    from xmask3d.engine.train import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = train_preset("tiny", max_steps=2, checkpoint_every=1, eval_max_views=1, ply_scenes=1,
                       checkpoint_dir=str(tmp_path / "ckpt"))
    result = train(synthetic_store, BENCH, "tiny", cfg, tracking_uri=uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.lr_3d"] == "0.003" and params["train.seed"] == "5557"
    assert params["protocol.base_ratio"] == "0.65" and "protocol.ensemble" in params
    assert params["data.text_encoder"] == "minilm"
    losses = client.get_metric_history(result.run_id, "loss/loss")
    assert sorted(m.step for m in losses) == [1, 2]
    assert client.get_metric_history(result.run_id, "loss/loss_binary")
    assert client.get_metric_history(result.run_id, "lr/3d")
    for key in ("3d", "2d", "fused", "baseline"):
        assert 0.0 <= result.metrics[f"{key}/miou_base"] <= 1.0
    # logged in percent, returned as fractions
    assert run.data.metrics["eval/fused/miou_base"] == pytest.approx(100 * result.metrics["fused/miou_base"])
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "evaluation")}
    assert {"evaluation/iou_per_class.png", "evaluation/confusion_fused.png", "evaluation/iou_per_class.md",
            "evaluation/metrics.json", "evaluation/ply"} <= artifacts
    plys = [a.path for a in client.list_artifacts(result.run_id, "evaluation/ply")]
    assert len(plys) == 2 and any(p.endswith("_gt.ply") for p in plys)
    # tiny validates after the last step too: best.pt is that step's model, kept beside last.pt
    assert [a.path for a in client.list_artifacts(result.run_id, "checkpoints")] == [
        "checkpoints/best.pt", "checkpoints/last.pt"]
    assert run.data.tags["best.step"] == "2" and run.data.tags["registered_checkpoint"] == "last.pt"
    version = client.get_model_version_by_alias("xmask3d-scannet20-b15n4", "candidate")
    assert str(version.version) == result.model_version and version.run_id == result.run_id

    # the registered pyfunc model predicts every point of a stored scene
    scene_id = open_store(synthetic_store).scene_ids("val")[0]
    import mlflow.artifacts

    # through the client: a models:/ URI handed to MLflow resolves against the process-wide registry URI
    source = client.get_model_version_download_uri("xmask3d-scannet20-b15n4", result.model_version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "pyfunc"),
                                                tracking_uri=uri)
    model = mlflow.pyfunc.load_model(local)
    frame = model.predict({"store_path": str(synthetic_store), "scene_id": scene_id})
    assert len(frame) == open_store(synthetic_store).scene(scene_id).num_points
    assert frame["label"].between(0, 18).all()

    # resume by run id: continues the same run from step 2
    resumed = train(synthetic_store, BENCH, "tiny", train_preset(
        "tiny", max_steps=3, evaluate=False, checkpoint_dir=str(tmp_path / "ckpt")), tracking_uri=uri,
        resume=result.run_id)
    assert resumed.run_id == result.run_id and resumed.steps == 3
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "loss/loss")) == [1, 2, 3]
    run = client.get_run(result.run_id)
    assert run.data.params["train.max_steps"] == "2" and run.data.tags["changed.train.max_steps"] == "3"

    # standalone evaluation of the registered model: a nested run with the same numbers
    from xmask3d.engine.evaluate import evaluate

    evaluation = evaluate(synthetic_store, BENCH, "models:/xmask3d-scannet20-b15n4@candidate",
                          tracking_uri=uri, max_views=1, ply_scenes=0)
    assert evaluation.metrics["fused/miou_base"] == pytest.approx(result.metrics["fused/miou_base"])
    nested = client.get_run(evaluation.run_id)
    assert nested.data.tags["mlflow.parentRunId"] == result.run_id
    assert nested.data.params["protocol.views"] == "first 1 valid views per scene"
    with pytest.raises(InputError, match="not found in the registry"):
        evaluate(synthetic_store, BENCH, "models:/xmask3d-scannet20-b15n4@nope", tracking_uri=uri)


# `xmask3d train` killed (SIGTERM, SIGKILL) and resumed on the real model: test_train_interrupted.py.


def test_thread_count_applies_before_anything_computes(synthetic_store, tmp_path, monkeypatch):
    """The recipe's intra-op thread count is set before the text embeddings and the model are
    computed, so a run's numbers do not depend on the thread count an earlier job left behind."""
    from xmask3d.engine import train as train_mod

    seen: list[int] = []

    def encoder_probe(name):
        seen.append(torch.get_num_threads())
        raise InterruptedError("stop after the probe")

    monkeypatch.setattr(train_mod, "build_text_encoder", encoder_probe)
    monkeypatch.setattr(train_mod, "fit", _no_fit)
    before = torch.get_num_threads()
    cfg = train_preset("tiny", checkpoint_dir=str(tmp_path / "ckpt"), torch_threads=3)
    try:
        with pytest.raises(InterruptedError):
            train_mod.train(synthetic_store, BENCH, "tiny", cfg,
                            tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    finally:
        torch.set_num_threads(before)
    assert seen == [3]


def test_a_run_in_training_cannot_be_resumed_by_a_second_process(synthetic_store, tmp_path):
    """While a live process holds a run's training lease, resuming that run fails with one line
    naming the holder and leaves the MLflow record alone; once the lease is free the resume
    proceeds (here up to the empty checkpoint's weights) and gives the lease back when it ends."""
    from mlflow import MlflowClient

    from preprocessing.text import build_text_encoder
    from storage.lease import Lease
    from xmask3d.engine import train as train_mod
    from xmask3d.engine.checkpoint import save_checkpoint
    from xmask3d.engine.tracking import RunTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = RunTracker(uri, BENCH).run_id
    root = tmp_path / "ckpt"
    save_checkpoint(root / run_id / "last.pt", {
        "model": {}, "preset": "tiny", "benchmark": BENCH, "run_id": run_id, "step": 3,
        "text_encoder": {"name": build_text_encoder("minilm").name}})
    cfg = train_preset("tiny", checkpoint_dir=str(root))
    lock = root / run_id / ".train.lock"
    holder = Lease(lock, "another training process").acquire()  # a live owner: this process
    try:
        with pytest.raises(InputError) as refused:
            train_mod.train(synthetic_store, BENCH, "tiny", cfg, tracking_uri=uri, resume=run_id)
    finally:
        holder.release()
    message = str(refused.value)
    assert f"MLflow run {run_id}" in message and f"pid {os.getpid()}" in message, message
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert "resume.count" not in run.data.tags and run.info.status == "RUNNING"

    with pytest.raises(InputError, match="does not fit the model"):  # past the lease
        train_mod.train(synthetic_store, BENCH, "tiny", cfg, tracking_uri=uri, resume=run_id)
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.tags["resume.count"] == "1" and run.info.status == "FAILED"
    assert not lock.exists()


def test_a_new_run_ends_runs_whose_training_process_is_gone(synthetic_store, tmp_path, monkeypatch):
    """A run left RUNNING by a killed process (its lease names a dead pid) is marked KILLED when the
    next run of the experiment starts; a RUNNING run without a lease here, or with a live holder,
    is left alone."""
    from mlflow import MlflowClient

    from storage.lease import Lease
    from xmask3d.engine import train as train_mod
    from xmask3d.engine.tracking import RunTracker

    monkeypatch.setattr(train_mod, "fit", _no_fit)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = tmp_path / "ckpt"
    dead, foreign, live = (RunTracker(uri, BENCH).run_id for _ in range(3))
    (root / dead).mkdir(parents=True)
    subprocess.run([sys.executable, "-c", "import os, sys; from storage.lease import Lease; "
                    "Lease(sys.argv[1], 'train').acquire(); os._exit(0)",  # exits holding it
                    str(root / dead / ".train.lock")], check=True, timeout=120)
    assert (root / dead / ".train.lock").is_file()
    holder = Lease(root / live / ".train.lock", "train").acquire()
    try:
        with pytest.raises(AssertionError, match="training started"):
            train_mod.train(synthetic_store, BENCH, "tiny", train_preset("tiny", checkpoint_dir=str(root)),
                            tracking_uri=uri)
    finally:
        holder.release()
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(dead).data.tags["ended.reason"].startswith("training process gone")
    assert not (root / dead / ".train.lock").exists()
    assert client.get_run(foreign).info.status == "RUNNING"
    assert client.get_run(live).info.status == "RUNNING"
