"""preprocess/<dataset>: (download ->) list scenes -> embed captions -> process scenes -> verify.

Orchestration only: each Prefect task is a stage and wraps plain functions of ``preprocessing/``.
The scenes themselves are plain Dask tasks (``preprocessing.run``) on a ``LocalCluster`` of worker
processes started once per run (while the captions are embedded), or on the Dask cluster at
``dask_address``: the workers neither import Prefect nor talk to its API, and never load the text
model (the driver embeds every caption of the run once and ships each scene its rows). This
process reports each scene as it completes (log line, progress artifact) and publishes the
per-scene table at the end. The store is the cache: a scene already complete in the store is
skipped (unless ``overwrite``). A failing scene does not stop the others; the flow run ends
Failed and names the failed scenes, and the good scenes stay in the store.

Run it without a server (ephemeral API) with ``xmask3d preprocess scannet --raw R --out S.zarr``
(``python -m flows.preprocess`` for the defaults), or as the deployments ``preprocess/scannet`` and
``preprocess/s3dis`` of prefect.yaml on a Prefect server and worker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from preprocessing import pipeline, run
from preprocessing.captions import CaptionEmbeddings, resolve_captions, resolve_region_captions
from preprocessing.clusters import ClusterSpec
from preprocessing.clusters import cluster_class as import_cluster_class
from preprocessing.s3dis.download import URL_ENV as S3DIS_URL_ENV
from preprocessing.s3dis.download import download_s3dis
from preprocessing.s3dis.views import view_captions
from preprocessing.scannet.download import URL_ENV as SCANNET_URL_ENV
from preprocessing.scannet.download import download_scannet
from storage.errors import InputError
from storage.objects import as_path
from storage.store import open_store, store_lock

DATASETS = ("scannet", "s3dis")


class ScenesFailedError(RuntimeError):
    """Some scenes could not be preprocessed (the others are in the store); ``summaries`` has all."""

    def __init__(self, message: str, summaries: list[pipeline.SceneSummary] | None = None):
        super().__init__(message)
        self.summaries = list(summaries or [])


def _not_input_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed download unless it failed on bad input (a 404, a web page, a refused URL)."""
    try:
        state.result()
    except InputError:
        return False
    except Exception:  # noqa: BLE001 - any other failure is worth a retry
        return True
    return True


def download_url(dataset: str, url_from: str) -> str:
    """The personal download URL, read where ``url_from`` says: ``env`` or ``secret:<block name>``.

    ``env`` reads ``XMASK3D_SCANNET_URL`` / ``XMASK3D_S3DIS_URL`` of the process running the flow
    (a worker passes its environment on); ``secret:NAME`` reads the Prefect Secret block NAME. The
    URL itself is never a flow parameter: parameters are stored in Prefect's database and shown in
    its UI. Messages never repeat it.
    """
    variable = {"scannet": SCANNET_URL_ENV, "s3dis": S3DIS_URL_ENV}[dataset]
    if url_from == "env":
        url = os.environ.get(variable, "")
        if not url:
            raise InputError(f"url_from='env' but ${variable} is not set where the flow runs")
        return url
    if url_from.startswith("secret:") and url_from.removeprefix("secret:"):
        name = url_from.removeprefix("secret:")
        try:
            return str(Secret.load(name).get())
        except ValueError:
            raise InputError(f"no Prefect Secret block named {name!r} (create it: see docs/operations.md)") \
                from None
    raise InputError("url_from must be 'env' or 'secret:<block name>' (the URL itself is never a "
                     "parameter: put it in $" + variable + " or a Secret block)")


@task(name="download", task_run_name="download-{dataset}", retries=3, cache_policy=NO_CACHE,
      retry_delay_seconds=exponential_backoff(2), retry_condition_fn=_not_input_error)
def download(dataset: str, raw_dir: str, url_from: str | None = None, mirror: str | None = None,
             scenes: list[str] | None = None, verify: bool = False) -> str:
    """Fetch the raw files into ``raw_dir`` (complete files are kept, so a retry resumes); -> raw_dir.

    The URL is resolved here from ``url_from`` (``download_url``), so it never passes through
    Prefect as a parameter or a result. ``verify`` re-checks files already on disk.
    """
    url = download_url(dataset, url_from) if url_from else None
    source = {"url": url, "mirror": Path(mirror) if mirror else None, "verify": verify}
    if dataset == "scannet":
        download_scannet(Path(raw_dir), scenes=scenes, **source)
    else:
        download_s3dis(Path(raw_dir), **source)
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
    return pipeline.prepare_store(dataset, raw, as_path(store), cfg, scenes)


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
    for scene_id in pipeline.complete_scenes(dataset, Path(raw_dir), as_path(store), listing, cfg):
        scene = opened.scene(scene_id)
        done[scene_id] = pipeline.SceneSummary(
            scene_id, "skipped", points=scene.num_points, frames_kept=scene.num_frames,
            frames_dropped=dict(scene.attrs.get("dropped_frames") or {}))
    return done


@task(name="embed-captions", task_run_name="embed-{dataset}-captions", cache_policy=NO_CACHE)
def embed_captions(dataset: str, scene_ids: list[str], cfg: pipeline.PreprocessConfig
                   ) -> CaptionEmbeddings | None:
    """Every caption text of the scenes to do, embedded once in this process (None: no captions)."""
    start = time.monotonic()
    table = run.embed_run_captions(dataset, scene_ids, cfg)
    if table is not None:
        get_run_logger().info("embedded %d caption texts of %d scenes with %s in %.1f s", len(table.texts),
                              len(scene_ids), table.encoder, time.monotonic() - start)
    return table


@task(name="process-scenes", task_run_name="process-{dataset}-scenes", cache_policy=NO_CACHE)
def process_scenes(dataset: str, raw_dir: str, store: str, listing: dict[str, str],
                   cfg: pipeline.PreprocessConfig, embeddings: CaptionEmbeddings | None,
                   cluster: run.SceneCluster) -> dict[str, pipeline.SceneSummary]:
    """One plain Dask task per scene; each result is logged and counted in the progress artifact
    as it arrives. A scene whose task fails gets a ``failed`` summary naming the error."""
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key=f"preprocess-{dataset}-progress",
                                        description=f"{len(listing)} scenes to preprocess")
    start = time.monotonic()
    client = cluster.client
    where = f"{cluster.local_workers} local workers" if cluster.local_workers else client.scheduler.address
    logger.info("Dask cluster (%s) ready; waited %.1f s", where, time.monotonic() - start)
    futures = run.submit_scenes(client, dataset, Path(raw_dir), as_path(store), listing, cfg, embeddings)
    summaries = {}
    for done, summary in enumerate(run.scene_results(futures), start=1):
        if summary.status == "failed":
            logger.error("scene %s failed: %s", summary.scene_id, summary.error)
        else:
            logger.info("%s scene %s: %d points, %d frames kept, dropped: %s (%.1f s)", summary.status,
                        summary.scene_id, summary.points, summary.frames_kept,
                        _dropped_text(summary.frames_dropped), summary.seconds)
        summaries[summary.scene_id] = summary
        update_progress_artifact(progress, 100.0 * done / len(listing))
    return summaries


@task(name="verify-store", task_run_name="verify-{dataset}-store", cache_policy=NO_CACHE)
def verify_and_report(dataset: str, store: str, summaries: list[pipeline.SceneSummary], seconds: float
                      ) -> list[pipeline.SceneSummary]:
    """Check every scene reported written is complete in the store, then publish the report."""
    opened = open_store(store)
    checked = []
    for summary in summaries:
        if summary.status == "written" and not opened.is_complete(summary.scene_id):
            summary = pipeline.SceneSummary(summary.scene_id, "failed",
                                            error=f"{store}: reported written but not complete in the store")
        checked.append(summary)
    publish_report(dataset, store, checked, seconds)
    return checked


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
    url_from: str | None = None,
    mirror: str | None = None,
    verify_download: bool = False,
    scenes: list[str] | None = None,
    frame_step: int = 20,
    captions: str | None = None,
    text_encoder: str = "minilm",
    dask_address: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    views: str | None = None,
    region_captions: str | None = None,
    cluster_class: str | None = None,
    cluster_kwargs: dict[str, Any] | None = None,
    cluster_jobs: int = 0,
    lock_wait_s: float = 0.0,
) -> list[pipeline.SceneSummary]:
    """Download (when ``url_from`` or ``mirror`` is given), then preprocess every scene; -> one summary each.

    ``url_from``: where the personal download URL is read, ``env`` (``$XMASK3D_SCANNET_URL`` /
    ``$XMASK3D_S3DIS_URL``) or ``secret:<Prefect Secret block>``; ``verify_download`` re-checks the
    raw files already on disk against the source.

    ``store``: a path or a bucket URL (``s3://``, ``gs://``, ``az://``; credentials from the
    environment of the flow run and of the Dask workers). ``cluster_class`` / ``cluster_kwargs`` /
    ``cluster_jobs``: a Dask cluster to start for the run instead of the local one, e.g.
    ``"dask_jobqueue.SLURMCluster"``, ``{"cores": 8, ...}``, 4 jobs (``preprocessing.clusters``).
    ``lock_wait_s``: how long to wait for another run's writer lock on the store before failing with
    its owner named (default: fail at once).

    Relative paths are resolved against the working directory of the flow run. Raises InputError
    on bad input (the run's state message) and ScenesFailedError, after the other scenes are
    done, when some scenes failed.
    """
    logger = get_run_logger()
    start = time.monotonic()
    if dataset not in DATASETS:
        raise InputError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if cluster_class:
        import_cluster_class(cluster_class)  # a bad class path fails before anything is written
    raw = str(Path(raw_dir).expanduser().resolve())
    out = str(as_path(store).expanduser().resolve())
    if url_from or mirror:
        download(dataset, raw, url_from=url_from, mirror=mirror, scenes=scenes, verify=verify_download)
        logger.info("raw %s files in %s", dataset, raw)
    views = str(Path(views).expanduser().resolve()) if views else None  # S3DIS: Stanford 2D-3D-S root
    with store_lock(out, f"preprocess {dataset} (flow)", wait_s=lock_wait_s):  # a second run names this one
        listing, cfg = prepare_store(dataset, raw, out, scenes, frame_step, captions, text_encoder, overwrite,
                                     views, region_captions)
        logger.info("%d %s scenes from %s into %s", len(listing), dataset, raw, out)
        stages = {"list": time.monotonic() - start}
        done = {} if cfg.overwrite else skip_complete(out, listing, dataset, raw, cfg)
        for scene_id in done:
            logger.info("skipped scene %s (complete in store)", scene_id)
        todo = {s: split for s, split in listing.items() if s not in done}
        if todo:
            spec = ClusterSpec(cluster_class, cluster_kwargs or {}, cluster_jobs) if cluster_class else None
            # the cluster starts while the captions are embedded
            with run.SceneCluster(dask_address, workers, len(todo), spec) as cluster:
                mark = time.monotonic()
                embeddings = embed_captions(dataset, list(todo), cfg)
                stages["captions"] = time.monotonic() - mark
                mark = time.monotonic()
                done.update(process_scenes(dataset, raw, out, todo, cfg, embeddings, cluster))
                stages["scenes"] = time.monotonic() - mark
                mark = time.monotonic()
            stages["cluster close"] = time.monotonic() - mark
        mark = time.monotonic()
        summaries = verify_and_report(dataset, out, [done[s] for s in listing], time.monotonic() - start)
        stages["verify"] = time.monotonic() - mark
        logger.info("preprocess stages: %s", ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
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
