"""preprocess/<dataset>: (download ->) one Prefect task per scene on Dask -> the Zarr store.

Orchestration only: each task wraps one plain function of ``preprocessing/``. The per-scene
tasks run on prefect-dask's ``DaskTaskRunner``: a ``LocalCluster`` of worker processes by default,
or the Dask cluster at ``dask_address``. The store is the cache: a scene already complete in the
store is skipped (unless ``overwrite``). A failing scene does not stop the others; the flow run
ends Failed and names the failed scenes, and the good scenes stay in the store.

Run it without a server (ephemeral API) with ``xmask3d preprocess scannet --raw R --out S.zarr``
(``python -m flows.preprocess`` for the defaults), or as the deployments ``preprocess/scannet`` and
``preprocess/s3dis`` of prefect.yaml on a Prefect server and worker.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect.tasks import exponential_backoff
from prefect_dask import DaskTaskRunner

from preprocessing import pipeline
from preprocessing.captions import resolve_captions, resolve_region_captions
from preprocessing.s3dis.download import download_s3dis
from preprocessing.s3dis.views import view_captions
from preprocessing.scannet.download import download_scannet
from storage.errors import InputError
from storage.store import open_store, store_lock

DATASETS = ("scannet", "s3dis")


class ScenesFailedError(RuntimeError):
    """Some scenes could not be preprocessed (the others are in the store); ``summaries`` has all."""

    def __init__(self, message: str, summaries: list[pipeline.SceneSummary] | None = None):
        super().__init__(message)
        self.summaries = list(summaries or [])


@task(name="download", task_run_name="download-{dataset}", retries=3, cache_policy=NO_CACHE,
      retry_delay_seconds=exponential_backoff(2))
def download(dataset: str, raw_dir: str, url: str | None = None, mirror: str | None = None,
             scenes: list[str] | None = None) -> str:
    """Fetch the raw files into ``raw_dir`` (complete files are kept, so a retry resumes); -> raw_dir."""
    if dataset == "scannet":
        download_scannet(Path(raw_dir), url=url, mirror=Path(mirror) if mirror else None, scenes=scenes)
        return raw_dir
    download_s3dis(Path(raw_dir), url=url, mirror=Path(mirror) if mirror else None)
    return raw_dir


@task(name="prepare-store", task_run_name="prepare-{dataset}-store", cache_policy=NO_CACHE)
def prepare_store(dataset: str, raw_dir: str, store: str, scenes: list[str] | None = None,
                  frame_step: int = 20, captions: str | None = None, text_encoder: str = "minilm",
                  overwrite: bool = False, views: str | None = None, region_captions: str | None = None
                  ) -> tuple[dict[str, str], pipeline.PreprocessConfig]:
    """Validate the inputs, create or open the store; -> (scene id -> split, the scene config).

    Every bad input (missing raw dir, unknown scene, missing captions, incompatible store) fails
    here, before any Dask worker starts. ``captions``: None = ``raw_dir/captions.json`` if present,
    ``"none"`` = no captions, else a caption JSON; ``region_captions`` likewise with
    ``raw_dir/region_captions.json`` (ScanNet: boxes + phrases per frame).
    """
    raw = Path(raw_dir)
    if not raw.is_dir():
        raise InputError(f"raw dir {raw} does not exist")
    if dataset == "s3dis":  # S3DIS captions belong to the 2D-3D-S views (default: VIEWS/captions.json)

        caption_file = view_captions(Path(views), captions) if views else None
    else:
        caption_file = resolve_captions(raw, captions)
    region_file = resolve_region_captions(raw, region_captions) if dataset == "scannet" else None
    cfg = pipeline.PreprocessConfig(frame_step=frame_step, overwrite=overwrite, text_encoder=text_encoder,
                                    captions=caption_file, views=Path(views) if views else None,
                                    region_captions=region_file)
    return pipeline.prepare_store(dataset, raw, Path(store), cfg, scenes)


@task(name="preprocess-scene", task_run_name="{dataset}-{scene_id}", cache_policy=NO_CACHE)
def preprocess_scene(dataset: str, raw_dir: str, scene_id: str, store: str, cfg: pipeline.PreprocessConfig,
                     split: str | None = None) -> pipeline.SceneSummary:
    """Decode, project, caption-embed and store one scene (a no-op if it is complete in the store)."""
    return pipeline.SCENE_FUNCTIONS[dataset](Path(raw_dir), scene_id, Path(store), cfg, split)


def local_workers(workers: int | None, scenes: int) -> int:
    """Worker processes of the local cluster: ``workers`` (default: CPU count, at most 4), <= scenes."""
    wanted = workers if workers is not None else min(4, os.cpu_count() or 1)
    if wanted < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    return max(1, min(wanted, scenes))


def dask_runner(dask_address: str | None, workers: int | None, scenes: int) -> DaskTaskRunner:
    """A runner on the cluster at ``dask_address``, or on a new LocalCluster of processes."""
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": local_workers(workers, scenes),
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": ":0",
    })


@contextlib.contextmanager
def api_shared_with_workers() -> Iterator[None]:
    """Let Dask worker processes report to this process's Prefect API.

    With the ephemeral API (no PREFECT_API_URL) every worker process would start a temporary
    server of its own; instead the settings shipped with each task point at this one's.
    """
    if get_current_settings().api.url:
        yield
        return

    server = SubprocessASGIServer()  # the running ephemeral server of this process
    if not server.running:
        yield
        return
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _dropped_text(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items()) if n) or "none"


def skip_complete(store: str, listing: dict[str, str], dataset: str, raw_dir: str,
                  cfg: pipeline.PreprocessConfig) -> dict[str, pipeline.SceneSummary]:
    """Summaries of the scenes complete in the store with this run's settings (the store is the cache)."""
    opened = open_store(store)
    done = {}
    for scene_id in pipeline.complete_scenes(dataset, Path(raw_dir), Path(store), listing, cfg):
        scene = opened.scene(scene_id)
        done[scene_id] = pipeline.SceneSummary(
            scene_id, "skipped", points=scene.num_points, frames_kept=scene.num_frames,
            frames_dropped=dict(scene.attrs.get("dropped_frames") or {}))
    return done


def run_scenes(dataset: str, raw_dir: str, store: str, listing: dict[str, str],
               cfg: pipeline.PreprocessConfig, dask_address: str | None = None, workers: int | None = None
               ) -> dict[str, pipeline.SceneSummary]:
    """Skip complete scenes, run one Dask task per other scene; -> a summary per scene, in order.

    A scene whose task fails gets a ``failed`` summary naming the error; the others carry on.
    """
    logger = get_run_logger()
    summaries = {} if cfg.overwrite else skip_complete(store, listing, dataset, raw_dir, cfg)
    for scene_id in summaries:
        logger.info("skipped scene %s (complete in store)", scene_id)
    todo = [s for s in listing if s not in summaries]
    if todo:
        worker_cfg = replace(cfg, show_progress=False) if len(todo) > 1 else cfg  # no interleaved bars
        progress = create_progress_artifact(0.0, key=f"preprocess-{dataset}-progress",
                                            description=f"{len(todo)} scenes to preprocess")
        with api_shared_with_workers(), dask_runner(dask_address, workers, len(todo)) as runner:
            futures = {}
            for scene_id in todo:
                parameters = {"dataset": dataset, "raw_dir": raw_dir, "scene_id": scene_id, "store": store,
                              "cfg": worker_cfg, "split": listing[scene_id]}
                futures[runner.submit(preprocess_scene, parameters)] = scene_id
            for done, future in enumerate(as_completed(list(futures)), start=1):
                scene_id = futures[future]
                try:
                    summary = future.result()
                except Exception as error:  # one bad scene must not stop the others
                    summary = pipeline.SceneSummary(scene_id, "failed",
                                                    error=f"{type(error).__name__}: {_one_line(error)}")
                    logger.error("scene %s failed: %s", scene_id, summary.error)
                else:
                    logger.info("wrote scene %s: %d points, %d frames kept, dropped: %s", scene_id,
                                summary.points, summary.frames_kept, _dropped_text(summary.frames_dropped))
                summaries[scene_id] = summary
                update_progress_artifact(progress, 100.0 * done / len(todo))
    return {scene_id: summaries[scene_id] for scene_id in listing}


def publish_report(dataset: str, store: str, summaries: list[pipeline.SceneSummary], seconds: float) -> None:
    """Per-scene table artifact (points, frames kept, frames dropped and why) and a markdown summary."""
    rows = [{"scene": s.scene_id, "status": s.status, "points": s.points, "frames_kept": s.frames_kept,
             "frames_dropped": _dropped_text(s.frames_dropped), "error": s.error or ""} for s in summaries]
    create_table_artifact(rows, key=f"preprocess-{dataset}-scenes",
                          description=f"Scenes of {store}: points, frames kept, frames dropped and why")
    counts = {k: sum(s.status == k for s in summaries) for k in ("written", "skipped", "failed")}
    written = [s for s in summaries if s.status == "written"]
    dropped: dict[str, int] = {}
    for s in written:
        for reason, n in s.frames_dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    lines = [
        f"# preprocess {dataset}",
        "",
        f"Store: `{store}`",
        "",
        "| scenes | written | skipped (complete) | failed | points written | frames kept | seconds |",
        "|---|---|---|---|---|---|---|",
        f"| {len(summaries)} | {counts['written']} | {counts['skipped']} | {counts['failed']} "
        f"| {sum(s.points for s in written)} | {sum(s.frames_kept for s in written)} | {seconds:.1f} |",
        "",
        f"Frames dropped while writing: {_dropped_text(dropped)}.",
    ]
    failed = [s for s in summaries if s.status == "failed"]
    if failed:
        lines += ["", "## Failed scenes", ""] + [f"- `{s.scene_id}`: {s.error}" for s in failed]
    create_markdown_artifact("\n".join(lines), key=f"preprocess-{dataset}-summary",
                             description=f"preprocess {dataset} run summary")


@flow(name="preprocess", description="Raw ScanNet / S3DIS -> chunked Zarr v3 store, one Dask task per scene.")
def preprocess(
    dataset: str = "scannet",
    raw_dir: str = "data/raw/scannet",
    store: str = "data/scannet.zarr",
    url: str | None = None,
    mirror: str | None = None,
    scenes: list[str] | None = None,
    frame_step: int = 20,
    captions: str | None = None,
    text_encoder: str = "minilm",
    dask_address: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    views: str | None = None,
    region_captions: str | None = None,
) -> list[pipeline.SceneSummary]:
    """Download (when ``url`` or ``mirror`` is given), then preprocess every scene; -> one summary each.

    Relative paths are resolved against the working directory of the flow run. Raises InputError
    on bad input (the run's state message) and ScenesFailedError, after the other scenes are
    done, when some scenes failed.
    """
    logger = get_run_logger()
    start = time.monotonic()
    if dataset not in DATASETS:
        raise InputError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    raw = str(Path(raw_dir).expanduser().resolve())
    out = str(Path(store).expanduser().resolve())
    if url or mirror:
        download(dataset, raw, url=url, mirror=mirror, scenes=scenes)
        logger.info("raw %s files in %s", dataset, raw)
    views = str(Path(views).expanduser().resolve()) if views else None  # S3DIS: Stanford 2D-3D-S root
    with store_lock(out, f"preprocess {dataset} (flow)"):  # a second run fails naming this one
        listing, cfg = prepare_store(dataset, raw, out, scenes, frame_step, captions, text_encoder, overwrite,
                                     views, region_captions)
        logger.info("%d %s scenes from %s into %s", len(listing), dataset, raw, out)
        summaries = list(run_scenes(dataset, raw, out, listing, cfg, dask_address, workers).values())
    publish_report(dataset, out, summaries, time.monotonic() - start)
    logger.info("%s\n%s", out, pipeline.format_summaries(summaries))
    failed = [s for s in summaries if s.status == "failed"]
    if failed:
        raise ScenesFailedError(f"{len(failed)} of {len(summaries)} scenes failed: "
                                + "; ".join(f"{s.scene_id}: {s.error}" for s in failed), summaries)
    return summaries


def run_locally(**parameters: Any) -> tuple[list[pipeline.SceneSummary], bool]:
    """Run the flow in this process (ephemeral API unless PREFECT_API_URL is set), for the CLI.

    -> (one summary per scene, whether every scene succeeded). Bad input raises InputError.
    """
    try:
        return preprocess(**parameters), True
    except ScenesFailedError as error:
        return error.summaries, False


if __name__ == "__main__":  # the guard a Dask LocalCluster of processes needs in a script
    preprocess()
