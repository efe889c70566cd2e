"""retrain/<benchmark>: scheduled; preprocess new scenes -> train -> evaluate -> promote if better.

The preprocess step runs in this flow run (a sub-flow: the store is the cache, so only new scenes
are processed). Training and evaluation need a GPU: when this flow runs from a deployment (on a
worker of the CPU pool) it triggers the ``train/<benchmark>`` and ``evaluate/<benchmark>``
deployments with ``run_deployment`` and waits for them, so they run on the GPU pool's workers;
run directly (``python -m flows.retrain``, the ephemeral API) it calls the same flows in process.
The registered version is evaluated, then the promotion rule (docs/training.md, "Promotion")
decides whether the alias ``champion`` moves to it; the decision and its reason are tagged on the
version and logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment
from prefect.runtime import deployment as current_deployment

from flows.evaluate import evaluate
from flows.preprocess import preprocess
from flows.train import promote, train
from storage.errors import InputError
from storage.objects import as_path
from xmask3d.network.config import PAPER_CLIP_MODEL

POLL_SECONDS = 2  # how often a triggered deployment's state is checked


class ChildRunFailedError(RuntimeError):
    """A triggered deployment run did not complete; the message carries its state message."""


def text_encoder_for(preset: str, clip_checkpoint: str | None) -> str:
    """The caption text space a preset trains in: the paper's CLIP ViT-L/14, else MiniLM."""
    if preset == "paper":
        if not clip_checkpoint:
            raise InputError("preset 'paper' needs clip_checkpoint (local open_clip ViT-L/14 weights)")
        return f"openclip:{PAPER_CLIP_MODEL}:{Path(clip_checkpoint).expanduser().resolve()}"
    return "minilm"


def run_child(name: str, parameters: dict[str, Any]) -> Any:
    """Run the deployment ``name`` (flow/deployment), wait for it, -> its result; fail with its reason."""
    logger = get_run_logger()
    flow_run = run_deployment(name, parameters=parameters, poll_interval=POLL_SECONDS, timeout=None)
    state = flow_run.state
    logger.info("deployment %s: flow run %s (%s) ended %s", name, flow_run.name, flow_run.id,
                state.name if state else "without a state")
    if state is None or not state.is_completed():
        reason = state.message if state and state.message else "no state message"
        raise ChildRunFailedError(f"{name} flow run {flow_run.name} ({flow_run.id}) ended "
                                  f"{state.name if state else 'without a state'}: {reason}")
    return state.result()


@flow(name="retrain", description="New scenes -> train -> evaluate -> champion if the promotion rule passes.")
def retrain(
    dataset: str = "scannet",
    raw_dir: str = "data/raw/scannet",
    store: str = "data/scannet-paper.zarr",
    url_from: str | None = None,
    mirror: str | None = None,
    benchmark: str = "scannet20-b15n4",
    preset: str = "paper",
    sd_dir: str | None = None,
    clip_checkpoint: str | None = None,
    train_config: dict[str, Any] | None = None,
    max_views: int = 0,
    tracking_uri: str | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
    use_deployments: bool | None = None,
) -> dict[str, Any]:
    """-> the new model version, its run id and metrics, and the promotion decision.

    ``use_deployments``: trigger the train / evaluate deployments (None = when this run itself
    comes from a deployment); False runs them as sub-flows in this process.
    """
    logger = get_run_logger()
    text_encoder = text_encoder_for(preset, clip_checkpoint)
    preprocess(dataset=dataset, raw_dir=raw_dir, store=store, url_from=url_from, mirror=mirror,
               text_encoder=text_encoder, dask_address=dask_address, workers=workers)
    store_path = str(as_path(store).expanduser().resolve())
    weights = {k: str(Path(v).expanduser().resolve()) for k, v in
               {"sd_dir": sd_dir, "clip_checkpoint": clip_checkpoint}.items() if v}
    train_params = {"store": store_path, "benchmark": benchmark, "preset": preset,
                    "train_config": train_config, "tracking_uri": tracking_uri, "promote_champion": False,
                    **weights}
    remote = current_deployment.id is not None if use_deployments is None else use_deployments
    if remote:
        logger.info("training and evaluating on the deployments train/%s and evaluate/%s (their work pool)",
                    benchmark, benchmark)
        refs = run_child(f"train/{benchmark}", train_params)
    else:
        refs = train(**train_params)
    if refs["model_version"] is None:
        raise InputError(f"training registered no model version (train_config {train_config} "
                         "turned evaluation off?)")
    version = str(refs["model_version"])
    eval_params = {"store": store_path, "benchmark": benchmark,
                   "model": f"models:/xmask3d-{benchmark}/{version}", "tracking_uri": tracking_uri,
                   "max_views": max_views}
    metrics = run_child(f"evaluate/{benchmark}", eval_params) if remote else evaluate(**eval_params)
    decision = promote(tracking_uri, benchmark, version, metrics)
    logger.info("model %s %s", benchmark, decision.summary())
    create_markdown_artifact(
        f"# retrain {benchmark}\n\nNew version **{version}** (run `{refs['run_id']}`): {decision.metric} "
        f"{100 * decision.value:.2f} %; **{decision.outcome}** ({decision.reason}).",
        key=f"retrain-{benchmark}", description="retraining outcome")
    return {"model_version": version, "run_id": refs["run_id"], "metric": decision.metric,
            "value": decision.value, "promoted": decision.promoted, "reason": decision.reason,
            "metrics": metrics}


if __name__ == "__main__":
    retrain()
