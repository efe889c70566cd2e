"""evaluate/<benchmark>: per-view inference, ensembling and mIoU base / novel / hIoU of one model.

The task wraps ``xmask3d.engine.evaluate.evaluate``, which also logs the metrics, per-class tables, charts
and PLY exports to MLflow (a run nested under the model's training run). The flow returns the
metrics and publishes them as a table artifact.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from storage.objects import as_path
from xmask3d.engine import evaluate as evaluation


@task(name="evaluate-model", task_run_name="evaluate-{benchmark}", cache_policy=NO_CACHE)
def evaluate_model(store: str, benchmark: str, model: str, tracking_uri: str | None = None,
                   max_views: int = 0, random_init: bool = False) -> dict[str, object]:
    """Evaluate ``model`` (models:/NAME@alias, models:/NAME/VERSION, a run id or a checkpoint);
    progress lines go to the run's Prefect logs."""

    result = evaluation.evaluate(as_path(store), benchmark, model, tracking_uri=tracking_uri,
                                 max_views=max_views, random_init=random_init, logger=get_run_logger())
    return {"metrics": dict(result.metrics), "run_id": result.run_id, "table": result.table()}


@flow(name="evaluate", description="Evaluate an XMask3D model: mIoU base / novel / hIoU per head.")
def evaluate(store: str = "data/scannet.zarr", benchmark: str = "scannet20-b15n4",
             model: str = "models:/xmask3d-scannet20-b15n4@champion", tracking_uri: str | None = None,
             max_views: int = 0, random_init: bool = False) -> dict[str, float]:
    """Evaluate one model on the validation scenes of the store; -> metrics ("<head>/<metric>",
    fractions in [0, 1]; the table artifact shows them in %). ``random_init``: accept a ``paper``
    model with random Stable Diffusion / CLIP weights."""
    logger = get_run_logger()
    store_path = str(as_path(store).expanduser().resolve())
    result = evaluate_model(store_path, benchmark, model, tracking_uri, max_views, random_init)
    metrics = result["metrics"]
    logger.info("%s on %s (MLflow run %s), scores in %%:\n%s", model, benchmark, result["run_id"],
                result["table"])
    create_table_artifact([{"metric": k, "value (%)": round(v, 2)}
                           for k, v in sorted(evaluation.as_percent(metrics).items())],
                          key=f"evaluate-{benchmark}", description=f"{model} on {benchmark}")
    return metrics


if __name__ == "__main__":
    evaluate()
