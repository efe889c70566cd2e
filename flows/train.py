"""train/<benchmark>: one training run of XMask3D on a preprocessed store, tracked in MLflow.

The task wraps ``xmask3d.train.train``; the run's parameters, losses, checkpoints and the
registered model version (alias ``candidate``) live in MLflow. The flow returns MLflow references
(run id, model URI), never arrays or weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE


@task(name="train-model", task_run_name="train-{benchmark}-{preset}", cache_policy=NO_CACHE)
def train_model(store: str, benchmark: str, preset: str, tracking_uri: str | None = None,
                resume: str | None = None) -> dict[str, Any]:
    """Train one model; returns the MLflow run id, the checkpoint path and the registered version."""
    from xmask3d.train import train as run_training

    result = run_training(Path(store), benchmark, preset, None, tracking_uri=tracking_uri, resume=resume)
    return train_result_refs(result)


def train_result_refs(result: Any) -> dict[str, Any]:
    """The references a TrainResult carries (paths, ids, numbers): what downstream tasks need."""
    refs = {}
    for field in ("run_id", "checkpoint", "model_version", "model_uri", "experiment_id", "steps"):
        value = getattr(result, field, None)
        if value is not None:
            refs[field] = str(value) if isinstance(value, Path) else value
    return refs


@flow(name="train", description="Train XMask3D on one benchmark; tracked and registered in MLflow.")
def train(store: str = "data/scannet.zarr", benchmark: str = "scannet20-b15n4", preset: str = "tiny",
          tracking_uri: str | None = None, resume: str | None = None) -> dict[str, Any]:
    """Train and register a new model version (alias ``candidate``); returns its MLflow references."""
    logger = get_run_logger()
    store_path = str(Path(store).expanduser().resolve())
    refs = train_model(store_path, benchmark, preset, tracking_uri, resume)
    logger.info("trained %s (%s): MLflow run %s, model version %s", benchmark, preset,
                refs.get("run_id"), refs.get("model_version"))
    create_markdown_artifact(
        "\n".join([f"# train {benchmark}", "", "| key | value |", "|---|---|"]
                  + [f"| {k} | `{v}` |" for k, v in refs.items()]),
        key=f"train-{benchmark}", description=f"training run of {benchmark} ({preset})")
    return refs


if __name__ == "__main__":
    train()
