"""retrain/<benchmark>: scheduled; preprocess new scenes -> train -> evaluate -> promote if better.

Each step is a sub-flow run (visible in the UI): the preprocess flow skips scenes already complete
in the store, training registers a new model version (alias ``candidate``), the registered version
is evaluated, and the MLflow alias ``champion`` moves to it only if its hIoU beats the current
champion's.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.evaluate import evaluate
from flows.preprocess import preprocess
from flows.train import HIOU, promote, train
from storage.errors import InputError
from storage.objects import as_path


@flow(name="retrain", description="New scenes -> train -> evaluate -> promote to champion if hIoU is better.")
def retrain(
    dataset: str = "scannet",
    raw_dir: str = "data/raw/scannet",
    store: str = "data/scannet.zarr",
    url_from: str | None = None,
    mirror: str | None = None,
    benchmark: str = "scannet20-b15n4",
    preset: str = "tiny",
    train_config: dict[str, Any] | None = None,
    max_views: int = 0,
    tracking_uri: str | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """-> the new model version, its run id and metrics, and whether it became the champion."""
    logger = get_run_logger()
    preprocess(dataset=dataset, raw_dir=raw_dir, store=store, url_from=url_from, mirror=mirror,
               dask_address=dask_address, workers=workers)
    store_path = str(as_path(store).expanduser().resolve())
    refs = train(store=store_path, benchmark=benchmark, preset=preset, train_config=train_config,
                 tracking_uri=tracking_uri, promote_champion=False)
    if refs["model_version"] is None:
        raise InputError(f"training registered no model version (train_config {train_config} "
                         "turned evaluation off?)")
    version = str(refs["model_version"])
    metrics = evaluate(store=store_path, benchmark=benchmark, model=f"models:/xmask3d-{benchmark}/{version}",
                       tracking_uri=tracking_uri, max_views=max_views)
    hiou = metrics[HIOU]
    promoted = promote(tracking_uri, benchmark, version, hiou)
    logger.info("model version %s: %s %.4f, %s", version, HIOU, hiou,
                "promoted to champion" if promoted else "champion unchanged")
    create_markdown_artifact(
        f"# retrain {benchmark}\n\nNew version **{version}** (run `{refs['run_id']}`): {HIOU} {hiou:.4f}; "
        + ("promoted to `champion`." if promoted else "`champion` unchanged (not better)."),
        key=f"retrain-{benchmark}", description="retraining outcome")
    return {"model_version": version, "run_id": refs["run_id"], "hiou": hiou, "promoted": promoted,
            "metrics": metrics}


if __name__ == "__main__":
    retrain()
