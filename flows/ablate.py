"""ablate/<benchmark>: the component ablation study as a flow (logic in ``xmask3d.engine.ablate``).

Opens a parent MLflow run, trains and evaluates each variant as a nested run (one task per variant,
in order: each one trains a model), then writes the comparison table (hIoU, mIoU base, mIoU novel of
the 3D, 2D and fused heads per variant) into the parent run and as a Prefect table artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from storage.objects import as_path
from xmask3d.engine.ablate import (
    VariantResult,
    end_failed,
    finish_ablation,
    resolve_variants,
    run_variant,
    start_ablation,
)


@task(name="start-ablation", cache_policy=NO_CACHE)
def start(store: str, benchmark: str, preset: str, variants: list[str], tracking_uri: str | None,
          train_config: dict[str, Any] | None) -> str:
    """Check the inputs, open the parent MLflow run; -> its run id."""

    return start_ablation(as_path(store), benchmark, preset, variants, tracking_uri, train_config)


@task(name="ablate-variant", task_run_name="variant-{variant}", cache_policy=NO_CACHE)
def variant_run(store: str, benchmark: str, preset: str, variant: str, parent_run_id: str,
                tracking_uri: str | None, train_config: dict[str, Any] | None, max_views: int,
                panel_scenes: int) -> dict[str, Any]:
    """Train and evaluate one variant as a nested MLflow run; -> its result as plain data."""

    return run_variant(as_path(store), benchmark, preset, variant, parent_run_id, tracking_uri, train_config,
                       max_views, panel_scenes).to_dict()


@task(name="finish-ablation", cache_policy=NO_CACHE)
def finish(parent_run_id: str, benchmark: str, preset: str, results: list[dict[str, Any]],
           tracking_uri: str | None) -> dict[str, Any]:
    """Comparison table into the parent run (markdown + CSV), run ended; -> rows and markdown."""

    done = finish_ablation(parent_run_id, benchmark, preset, [VariantResult.from_dict(r) for r in results],
                           tracking_uri)
    return {"rows": done.rows, "markdown": done.markdown}


@flow(name="ablate", description="Ablation study: train + evaluate model variants, compare in one table.")
def ablate(store: str = "data/scannet.zarr", benchmark: str = "scannet20-b15n4", preset: str = "tiny",
           variants: list[str] | None = None, train_config: dict[str, Any] | None = None,
           tracking_uri: str | None = None, max_views: int = 0, panel_scenes: int = 1) -> dict[str, Any]:
    """Variants default to the full model and each component switch off alone.

    ``train_config`` overrides fields of the preset's TrainConfig for every variant (e.g.
    ``{"epochs": 1}``); ``max_views`` limits the views per validation scene (0 = all).
    -> parent_run_id, variants (per-variant results), rows (the table).
    """

    logger = get_run_logger()
    names = resolve_variants(variants)
    store_path = str(as_path(store).expanduser().resolve())
    parent = start(store_path, benchmark, preset, names, tracking_uri, train_config)
    logger.info("ablation of %s (%s): parent MLflow run %s, variants %s", benchmark, preset, parent,
                ", ".join(names))
    results = []
    try:
        for name in names:
            results.append(variant_run(store_path, benchmark, preset, name, parent, tracking_uri,
                                       train_config, max_views, panel_scenes))
    except BaseException:
        end_failed(parent, benchmark, tracking_uri)
        raise
    table = finish(parent, benchmark, preset, results, tracking_uri)
    create_table_artifact(table["rows"], key=f"ablate-{benchmark}",
                          description=f"ablation of {benchmark} ({preset}); MLflow parent run {parent}")
    create_markdown_artifact(table["markdown"], key=f"ablate-{benchmark}-report",
                             description=f"ablation of {benchmark} ({preset})")
    logger.info("\n%s", table["markdown"])
    return {"parent_run_id": parent, "variants": results, "rows": table["rows"]}


if __name__ == "__main__":
    ablate()
