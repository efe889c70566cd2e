"""retrain/<benchmark>: scheduled; preprocess new scenes -> train -> evaluate -> promote if better.

Each step is a sub-flow run (visible in the UI): the preprocess flow skips scenes already complete
in the store, training registers a new model version (alias ``candidate``), and the MLflow alias
``champion`` moves to it only if its hIoU beats the current champion's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.evaluate import evaluate, headline_hiou
from flows.preprocess import preprocess
from flows.train import train


@task(name="promote-if-better", task_run_name="promote-{benchmark}-v{version}", cache_policy=NO_CACHE)
def promote(tracking_uri: str | None, benchmark: str, version: str, hiou: float) -> bool:
    """Move the ``champion`` alias to ``version`` if its hIoU beats the champion's; True if moved."""
    from xmask3d.tracking import promote_if_better

    return promote_if_better(tracking_uri, benchmark, version, hiou)


@flow(name="retrain", description="New scenes -> train -> evaluate -> promote to champion if hIoU is better.")
def retrain(
    dataset: str = "scannet",
    raw_dir: str = "data/raw/scannet",
    store: str = "data/scannet.zarr",
    url: str | None = None,
    mirror: str | None = None,
    benchmark: str = "scannet20-b15n4",
    preset: str = "tiny",
    tracking_uri: str | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Returns the new model version, its metrics and whether it became the champion."""
    logger = get_run_logger()
    preprocess(dataset=dataset, raw_dir=raw_dir, store=store, url=url, mirror=mirror,
               dask_address=dask_address, workers=workers)
    store_path = str(Path(store).expanduser().resolve())
    refs = train(store=store_path, benchmark=benchmark, preset=preset, tracking_uri=tracking_uri)
    version = str(refs["model_version"])
    metrics = evaluate(store=store_path, benchmark=benchmark, model=f"models:/xmask3d-{benchmark}/{version}",
                       tracking_uri=tracking_uri)
    hiou = headline_hiou(metrics)
    promoted = promote(tracking_uri, benchmark, version, hiou)
    logger.info("model version %s: hIoU %.4f, %s", version, hiou,
                "promoted to champion" if promoted else "champion unchanged")
    create_markdown_artifact(
        f"# retrain {benchmark}\n\nNew version **{version}** (run `{refs.get('run_id')}`): hIoU {hiou:.4f}; "
        + ("promoted to `champion`." if promoted else "`champion` unchanged (not better)."),
        key=f"retrain-{benchmark}", description="retraining outcome")
    return {"model_version": version, "run_id": refs.get("run_id"), "hiou": hiou, "promoted": promoted,
            "metrics": metrics}


if __name__ == "__main__":
    retrain()
