"""train/<benchmark>: one training run of XMask3D on a preprocessed store, tracked in MLflow.

The task wraps ``xmask3d.engine.train.train``: it trains, evaluates on the store's validation scenes,
logs everything to MLflow and registers a new model version (alias ``candidate``). The flow then
moves the alias ``champion`` to that version if its hIoU beats the current champion's (as
``xmask3d train`` does), unless ``promote=False``. Results are MLflow references and metrics.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from storage.objects import as_path
from xmask3d.engine import train as training
from xmask3d.engine.evaluate import as_percent
from xmask3d.engine.tracking import promote_if_better
from xmask3d.engine.train import train_preset

HIOU = "fused/hiou"  # the number models are compared by


@task(name="train-model", task_run_name="train-{benchmark}-{preset}", cache_policy=NO_CACHE)
def train_model(store: str, benchmark: str, preset: str = "tiny", train_config: dict[str, Any] | None = None,
                tracking_uri: str | None = None, resume: str | None = None, sd_dir: str | None = None,
                clip_checkpoint: str | None = None, caption_supervision: str | None = None,
                random_init: bool = False) -> dict[str, Any]:
    """Train, evaluate and register one model; -> MLflow run id, model version and URI, metrics.
    Progress (per epoch: loss, lr, step/s, ETA; validations) goes to the run's Prefect logs."""

    cfg = train_preset(preset, **(train_config or {}))
    result = training.train(as_path(store), benchmark, preset, cfg, tracking_uri=tracking_uri, resume=resume,
                            sd_dir=sd_dir, clip_checkpoint=clip_checkpoint,
                            caption_supervision=caption_supervision, random_init=random_init,
                            logger=get_run_logger())
    return {"run_id": result.run_id, "checkpoint": str(result.checkpoint_path), "model_uri": result.model_uri,
            "model_version": result.model_version, "steps": result.steps, "metrics": dict(result.metrics)}


@task(name="promote-if-better", task_run_name="promote-{benchmark}-v{version}", cache_policy=NO_CACHE)
def promote(tracking_uri: str | None, benchmark: str, version: str, hiou: float) -> bool:
    """Move the ``champion`` alias to ``version`` if its hIoU beats the champion's; True if moved."""

    return promote_if_better(tracking_uri, benchmark, version, hiou)


@flow(name="train", description="Train XMask3D on one benchmark; tracked and registered in MLflow.")
def train(store: str = "data/scannet.zarr", benchmark: str = "scannet20-b15n4", preset: str = "tiny",
          train_config: dict[str, Any] | None = None, tracking_uri: str | None = None,
          resume: str | None = None, sd_dir: str | None = None, clip_checkpoint: str | None = None,
          promote_champion: bool = True, caption_supervision: str | None = None,
          random_init: bool = False) -> dict[str, Any]:
    """Train and register a new model version; -> its MLflow references, metrics, and ``promoted``.

    ``train_config`` overrides fields of the preset's TrainConfig (e.g. ``{"epochs": 1}``);
    ``caption_supervision``: "official" | "region" | "official+region" (None = the preset's);
    ``random_init``: let the ``paper`` preset train without its Stable Diffusion / CLIP weights.
    Metrics returned are fractions in [0, 1]; the markdown artifact shows them in %.
    """
    logger = get_run_logger()
    store_path = str(as_path(store).expanduser().resolve())
    refs = train_model(store_path, benchmark, preset, train_config, tracking_uri, resume, sd_dir,
                       clip_checkpoint, caption_supervision, random_init)
    refs["promoted"] = False
    if promote_champion and refs["model_version"] is not None and HIOU in refs["metrics"]:
        refs["promoted"] = promote(tracking_uri, benchmark, refs["model_version"], refs["metrics"][HIOU])
    logger.info("trained %s (%s): MLflow run %s, model %s, %s %.1f %%%s", benchmark, preset, refs["run_id"],
                refs["model_uri"], HIOU, 100 * refs["metrics"].get(HIOU, float("nan")),
                " (now champion)" if refs["promoted"] else "")
    rows = [f"| {k} | `{v}` |" for k, v in refs.items() if k != "metrics"]
    rows += [f"| {k} (%) | {v:.1f} |" for k, v in sorted(as_percent(refs["metrics"]).items())]
    create_markdown_artifact("\n".join([f"# train {benchmark} ({preset})", "", "| | |", "|---|---|", *rows]),
                             key=f"train-{benchmark}", description=f"training run of {benchmark}")
    return refs


if __name__ == "__main__":
    train()
