"""preprocess/<dataset>: (download ->) one Prefect task per scene on Dask -> the Zarr store.

Orchestration only: each task wraps one plain function of ``preprocessing/``. The per-scene
tasks run on prefect-dask's ``DaskTaskRunner``: a ``LocalCluster`` of worker processes by default,
or the Dask cluster at ``dask_address``. The store is the cache: a scene already complete in the
store is skipped (unless ``overwrite``). A failing scene does not stop the others; the flow run
ends Failed and names the failed scenes, and the good scenes stay in the store.

Run it without a server (ephemeral API)::

    python -m flows.preprocess --raw data/raw/scannet --out data/scannet.zarr

or as the deployments ``preprocess/scannet`` and ``preprocess/s3dis`` (prefect.yaml).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect.tasks import exponential_backoff
from prefect_dask import DaskTaskRunner

from preprocessing import pipeline
from storage.errors import InputError

DATASETS = ("scannet", "s3dis")


class ScenesFailedError(RuntimeError):
    """Some scenes could not be preprocessed (the others are in the store)."""


class ScenesInputError(InputError):
    """Some scenes could not be preprocessed because their raw files are bad."""


@task(name="download", task_run_name="download-{dataset}", retries=3, cache_policy=NO_CACHE,
      retry_delay_seconds=exponential_backoff(2))
def download(dataset: str, raw_dir: str, url: str | None = None, mirror: str | None = None,
             scenes: list[str] | None = None) -> str:
    """Fetch the raw files into ``raw_dir`` (complete files are kept, so a retry resumes)."""
    logger = get_run_logger()
    if dataset == "scannet":
        from preprocessing.scannet.download import download_scannet

        paths = download_scannet(Path(raw_dir), url=url, mirror=Path(mirror) if mirror else None,
                                 scenes=scenes)
    else:
        from preprocessing.s3dis.download import download_s3dis

        paths = download_s3dis(Path(raw_dir), url=url, mirror=Path(mirror) if mirror else None)
    logger.info("%d raw files in %s", len(paths), raw_dir)
    return raw_dir


@task(name="list-scenes", task_run_name="list-{dataset}-scenes", cache_policy=NO_CACHE)
def list_scenes(dataset: str, raw_dir: str, scenes: list[str] | None = None) -> list[str]:
    """The scene (ScanNet) or room (S3DIS) ids to process; InputError for unknown ones."""
    raw = Path(raw_dir)
    if not raw.is_dir():
        raise InputError(f"raw dir {raw} does not exist")
    available = list(pipeline.list_scannet_scenes(raw) if dataset == "scannet"
                     else pipeline.list_s3dis_rooms(raw))
    if scenes is None:
        return available
    unknown = [s for s in scenes if s not in available]
    if unknown:
        raise InputError(f"scene {unknown[0]} does not exist in {raw}"
                         + (f" (and {len(unknown) - 1} more unknown)" if len(unknown) > 1 else ""))
    return list(dict.fromkeys(scenes))


@task(name="preprocess-scene", task_run_name="{dataset}-{scene_id}", cache_policy=NO_CACHE)
def preprocess_scene(dataset: str, raw_dir: str, scene_id: str, store: str,
                     cfg: pipeline.PreprocessConfig) -> pipeline.SceneSummary:
    """Decode, project, caption-embed and store one scene (a no-op if it is complete in the store)."""
    fn = pipeline.preprocess_scannet_scene if dataset == "scannet" else pipeline.preprocess_s3dis_room
    summary = fn(Path(raw_dir), scene_id, Path(store), cfg)
    if summary.status == "failed":
        raise InputError(f"{scene_id}: {summary.error}")
    return summary


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
    from prefect.server.api.server import SubprocessASGIServer

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


def run_scenes(dataset: str, raw_dir: str, store: str, scene_ids: list[str], cfg: pipeline.PreprocessConfig,
               dask_address: str | None, workers: int | None
               ) -> tuple[list[pipeline.SceneSummary], dict[str, BaseException]]:
    """Submit one task per scene to Dask; collect summaries and per-scene errors as they finish."""
    logger = get_run_logger()
    summaries: list[pipeline.SceneSummary] = []
    errors: dict[str, BaseException] = {}
    progress = create_progress_artifact(0.0, key=f"preprocess-{dataset}-progress",
                                        description=f"scenes done of {len(scene_ids)}")
    with api_shared_with_workers(), dask_runner(dask_address, workers, len(scene_ids)) as runner:
        futures = {runner.submit(preprocess_scene, {"dataset": dataset, "raw_dir": raw_dir, "scene_id": s,
                                                    "store": store, "cfg": cfg}): s for s in scene_ids}
        for done, future in enumerate(as_completed(list(futures)), start=1):
            scene_id = futures[future]
            try:
                summary = future.result()
            except Exception as error:  # one bad scene must not stop the others
                errors[scene_id] = error
                logger.error("scene %s failed: %s", scene_id, _one_line(error))
            else:
                summaries.append(summary)
                if summary.status == "skipped":
                    logger.info("skipped scene %s (complete in store)", scene_id)
                else:
                    logger.info("wrote scene %s: %d points, %d frames kept, dropped: %s", scene_id,
                                summary.points, summary.frames_kept, _dropped_text(summary.frames_dropped))
            update_progress_artifact(progress, 100.0 * done / len(scene_ids))
    return summaries, errors


def publish_report(dataset: str, store: str, scene_ids: list[str], summaries: list[pipeline.SceneSummary],
                   errors: dict[str, BaseException], seconds: float) -> None:
    """Per-scene table artifact and a markdown summary of the run."""
    by_id = {s.scene_id: s for s in summaries}
    rows = []
    for scene_id in scene_ids:
        s = by_id.get(scene_id)
        if s is None:
            rows.append({"scene": scene_id, "points": None, "frames_kept": None, "frames_dropped": None,
                         "status": "failed", "error": _one_line(errors[scene_id])})
        else:
            rows.append({"scene": scene_id, "points": s.points, "frames_kept": s.frames_kept,
                         "frames_dropped": _dropped_text(s.frames_dropped), "status": s.status,
                         "error": s.error or ""})
    create_table_artifact(rows, key=f"preprocess-{dataset}-scenes",
                          description=f"Scenes of {store}: points, frames kept, frames dropped and why")
    counts = {status: sum(r["status"] == status for r in rows) for status in ("written", "skipped", "failed")}
    dropped: dict[str, int] = {}
    for s in summaries:
        for reason, n in s.frames_dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    lines = [
        f"# preprocess {dataset}",
        "",
        f"Store: `{store}`",
        "",
        "| scenes | written | skipped (complete) | failed | points written | frames kept | seconds |",
        "|---|---|---|---|---|---|---|",
        f"| {len(rows)} | {counts['written']} | {counts['skipped']} | {counts['failed']} "
        f"| {sum(s.points for s in summaries if s.status == 'written')} "
        f"| {sum(s.frames_kept for s in summaries if s.status == 'written')} | {seconds:.1f} |",
        "",
        f"Frames dropped: {_dropped_text(dropped)}.",
    ]
    if errors:
        lines += ["", "## Failed scenes", ""] + [f"- `{k}`: {_one_line(v)}" for k, v in errors.items()]
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
    dask_address: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
) -> str:
    """Download (when ``url`` or ``mirror`` is given), then preprocess every scene; returns the store path.

    Relative paths are resolved against the working directory of the flow run.
    """
    logger = get_run_logger()
    start = time.monotonic()
    if dataset not in DATASETS:
        raise InputError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    raw = str(Path(raw_dir).expanduser().resolve())
    out = str(Path(store).expanduser().resolve())
    if url or mirror:
        download(dataset, raw, url=url, mirror=mirror, scenes=scenes)
    scene_ids = list_scenes(dataset, raw, scenes)
    if not scene_ids:
        raise InputError(f"no scenes found in {raw}")
    cfg = pipeline.PreprocessConfig(frame_step=frame_step,
                                    captions=Path(captions).expanduser().resolve() if captions else None,
                                    overwrite=overwrite)
    logger.info("preprocessing %d %s scenes from %s into %s", len(scene_ids), dataset, raw, out)
    summaries, errors = run_scenes(dataset, raw, out, scene_ids, cfg, dask_address, workers)
    publish_report(dataset, out, scene_ids, summaries, errors, time.monotonic() - start)
    if errors:
        listing = "; ".join(f"{k}: {_one_line(v)}" for k, v in errors.items())
        error_type = ScenesInputError if all(isinstance(e, InputError) for e in errors.values()) \
            else ScenesFailedError
        raise error_type(f"{len(errors)} of {len(scene_ids)} scenes failed: {listing}")
    return out


if __name__ == "__main__":  # the guard a Dask LocalCluster of processes needs
    import argparse

    parser = argparse.ArgumentParser(description="Run the preprocess flow on the ephemeral Prefect API.")
    parser.add_argument("--dataset", default="scannet", choices=DATASETS)
    parser.add_argument("--raw", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--url")
    parser.add_argument("--mirror")
    parser.add_argument("--scenes", help="comma-separated scene ids")
    parser.add_argument("--frame-step", type=int, default=20)
    parser.add_argument("--captions")
    parser.add_argument("--dask-address")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--overwrite", action="store_true")
    a = parser.parse_args()
    preprocess(dataset=a.dataset, raw_dir=a.raw, store=a.out, url=a.url, mirror=a.mirror,
               scenes=a.scenes.split(",") if a.scenes else None, frame_step=a.frame_step, captions=a.captions,
               dask_address=a.dask_address, workers=a.workers, overwrite=a.overwrite)
