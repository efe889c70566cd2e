"""evaluate/<benchmark>: per-view inference, ensembling and mIoU base / novel / hIoU of one model.

The task wraps ``xmask3d.evaluate.evaluate``; metrics, per-class tables, charts and PLY exports are
logged to MLflow by that function. The flow returns the metrics (numbers) and publishes them as a
table artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE


@task(name="evaluate-model", task_run_name="evaluate-{benchmark}", cache_policy=NO_CACHE)
def evaluate_model(store: str, benchmark: str, model: str,
                   tracking_uri: str | None = None) -> dict[str, float]:
    """Evaluate ``model`` (models:/NAME@alias, models:/NAME/VERSION, a run id or a checkpoint)."""
    from xmask3d.evaluate import evaluate as run_evaluation

    result = run_evaluation(Path(store), benchmark, model, tracking_uri=tracking_uri)
    return metrics_of(result)


def metrics_of(result: Any) -> dict[str, float]:
    """The scalar metrics of an evaluation result (a mapping, or an object with ``metrics``)."""
    metrics = result if isinstance(result, dict) else getattr(result, "metrics", None)
    if not isinstance(metrics, dict):
        raise TypeError(f"evaluation returned {type(result).__name__}, expected metrics")
    return {str(k): float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def headline_hiou(metrics: dict[str, float]) -> float:
    """The hIoU used to compare models: the fused head's, else the plain ``hiou`` key."""
    for key in ("fused/hiou", "hiou_fused", "fused_hiou", "hiou"):
        if key in metrics:
            return metrics[key]
    raise KeyError(f"no hIoU among the metrics {sorted(metrics)}")


@flow(name="evaluate", description="Evaluate an XMask3D model: mIoU base / novel / hIoU per head.")
def evaluate(store: str = "data/scannet.zarr", benchmark: str = "scannet20-b15n4",
             model: str = "models:/xmask3d-scannet20-b15n4@champion",
             tracking_uri: str | None = None) -> dict[str, float]:
    """Evaluate one model on the validation scenes of the store; returns the metrics."""
    logger = get_run_logger()
    metrics = evaluate_model(str(Path(store).expanduser().resolve()), benchmark, model, tracking_uri)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
    logger.info("%s on %s: %s", model, benchmark, shown)
    create_table_artifact([{"metric": k, "value": round(v, 4)} for k, v in sorted(metrics.items())],
                          key=f"evaluate-{benchmark}", description=f"{model} on {benchmark}")
    return metrics


if __name__ == "__main__":
    evaluate()
