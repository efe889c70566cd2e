"""Drive the per-scene functions as plain Dask tasks: one cluster per run, captions embedded once.

The driver (this process, or the Prefect flow's) lists the scenes, starts the cluster in the
background, embeds every caption of the run in one batched pass while the workers start
(``embed_run_captions``), then submits ``pipeline.preprocess_scene_safe`` once per scene with
that scene's rows of the table, and takes results as they complete (``scene_results``). The
workers import ``preprocessing.pipeline`` only: no Prefect, no torch, no text model.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import dask
from distributed import Client, Future, LocalCluster, as_completed
from tqdm.auto import tqdm

from preprocessing import pipeline
from preprocessing.caption_embed import embed_texts
from preprocessing.captions import CaptionEmbeddings
from preprocessing.clusters import ClusterSpec, cluster_class, start_cluster
from preprocessing.pipeline import PreprocessConfig, SceneSummary, preprocess_scene_safe, scene_texts
from storage.errors import InputError
from storage.objects import as_path
from storage.store import store_lock

WORKER_MODULE = "preprocessing.pipeline"  # imported by each local worker as it starts
# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also switches off glibc's
# adaptive mmap threshold: every array above 128 KiB became a fresh mmap + page faults, and a scene
# took 1.47x its in-process time (1.26 vs 0.86 s, quiet 2-core machine). Arrays up to 32 MiB from
# the heap again: 0.97 s. Set before the worker process starts (malloc reads it at start-up).
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": 32 * 1024 * 1024}


def local_workers(workers: int | None, scenes: int) -> int:
    """Worker processes of the local cluster: ``workers`` (default: CPU count, at most 4), <= scenes."""
    wanted = workers if workers is not None else min(4, os.cpu_count() or 1)
    if wanted < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    return max(1, min(wanted, scenes))


class SceneCluster:
    """A Dask client on the scheduler at ``dask_address``, on a cluster started from ``cluster``
    (a class path and its keyword arguments, e.g. ``dask_jobqueue.SLURMCluster``), or on a new
    ``LocalCluster`` of single-threaded worker processes; started in a background thread so the
    driver can embed captions meanwhile. ``client`` waits for it. A context manager: closes what
    it started (a jobqueue cluster cancels its jobs)."""

    def __init__(self, dask_address: str | None, workers: int | None, scenes: int,
                 cluster: ClusterSpec | None = None) -> None:
        if dask_address and cluster is not None:
            raise InputError("give a Dask scheduler address or a cluster class, not both")
        if cluster is not None:
            cluster_class(cluster.cls)  # a bad class path fails here, before any work
        self.local_workers = None if dask_address or cluster else local_workers(workers, scenes)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dask-start")
        self._started = self._pool.submit(self._start, dask_address, cluster)

    def _start(self, dask_address: str | None, spec: ClusterSpec | None) -> tuple[Client, Any]:
        if dask_address:
            return Client(dask_address), None
        if spec is not None:
            started = start_cluster(spec)
            try:
                return Client(started), started
            except BaseException:
                started.close()
                raise
        malloc = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_MALLOC.items()}
        with dask.config.set(malloc):
            cluster = LocalCluster(n_workers=self.local_workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, preload=[WORKER_MODULE])
        try:
            return Client(cluster), cluster
        except BaseException:
            cluster.close()
            raise

    @property
    def client(self) -> Client:
        return self._started.result()[0]

    def close(self) -> None:
        try:
            client, cluster = self._started.result()
        except Exception:  # noqa: BLE001 - a failed start has nothing to close
            return
        finally:
            self._pool.shutdown()
        client.close()
        if cluster is not None:
            cluster.close()

    def __enter__(self) -> SceneCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def needs_embeddings(dataset: str, cfg: PreprocessConfig) -> bool:
    """Whether the scenes store caption embeddings (view captions or ScanNet region captions)."""
    return cfg.captions is not None or (dataset == "scannet" and cfg.region_captions is not None)


def embed_run_captions(dataset: str, scene_ids: Iterable[str], cfg: PreprocessConfig
                       ) -> CaptionEmbeddings | None:
    """Every caption text the scenes may store, embedded once, batched (None: no captions)."""
    if not needs_embeddings(dataset, cfg):
        return None
    texts: set[str] = set()
    for scene_id in scene_ids:
        texts |= scene_texts(dataset, scene_id, cfg)
    return embed_texts(texts, cfg.text_encoder)


def submit_scenes(client: Client, dataset: str, raw_dir: Path, store_path: Path, listing: dict[str, str],
                  cfg: PreprocessConfig, embeddings: CaptionEmbeddings | None) -> dict[Future, str]:
    """One plain Dask task per scene (``preprocess_scene_safe``); -> future -> scene id."""
    worker_cfg = replace(cfg, show_progress=False)  # no interleaved progress bars from workers
    run = uuid.uuid4().hex[:8]  # a fresh key per run: a finished run's results are never reused
    futures = {}
    for scene_id, split in listing.items():
        table = embeddings.select(scene_texts(dataset, scene_id, cfg)) if embeddings is not None else None
        future = client.submit(preprocess_scene_safe, dataset, Path(raw_dir), scene_id, as_path(store_path),
                               worker_cfg, split, table, key=f"preprocess_scene-{scene_id}-{run}")
        futures[future] = scene_id
    return futures


def scene_results(futures: dict[Future, str]) -> Iterator[SceneSummary]:
    """Summaries in completion order; a task that dies (e.g. its worker was killed) is a failed scene."""
    for future in as_completed(list(futures)):
        scene_id = futures[future]
        try:
            summary = future.result()
        except Exception as error:  # noqa: BLE001 - one bad scene must not stop the others
            lines = str(error).strip().splitlines()
            summary = SceneSummary(scene_id, "failed",
                                   error=f"{type(error).__name__}: {lines[0] if lines else 'no message'}")
        future.release()
        yield summary


def run_preprocess(dataset: str, raw_dir: Path, store_path: Path, cfg: PreprocessConfig,
                   scenes: Iterable[str] | None = None, dask_address: str | None = None,
                   workers: int | None = None, lock_wait_s: float = 0.0,
                   cluster: ClusterSpec | None = None) -> list[SceneSummary]:
    """Preprocess scenes with Dask, without Prefect; -> one summary per scene, in listing order.

    Scenes complete in the store are skipped by the per-scene function (unless ``cfg.overwrite``).
    ``dask_address``: an existing scheduler; otherwise a ``LocalCluster`` of ``workers``
    single-threaded processes (default: min(CPU count, 4, scenes)); ``cluster``: a cluster class and
    its keyword arguments to start instead (``preprocessing.clusters``). The run holds the store's
    writer lock; another run's lock is waited for up to ``lock_wait_s`` seconds, then an
    InputError names it.
    """
    with store_lock(store_path, f"preprocess {dataset}", wait_s=lock_wait_s):
        return _run_preprocess(dataset, raw_dir, store_path, cfg, scenes, dask_address, workers, cluster)


def _run_preprocess(dataset: str, raw_dir: Path, store_path: Path, cfg: PreprocessConfig,
                    scenes: Iterable[str] | None, dask_address: str | None, workers: int | None,
                    spec: ClusterSpec | None) -> list[SceneSummary]:
    raw_dir, store_path = Path(raw_dir).resolve(), as_path(store_path).resolve()
    listing, cfg = pipeline.prepare_store(dataset, raw_dir, store_path, cfg, scenes)
    summaries: dict[str, SceneSummary] = {}
    with SceneCluster(dask_address, workers, len(listing), spec) as cluster:
        embeddings = embed_run_captions(dataset, listing, cfg)
        futures = submit_scenes(cluster.client, dataset, raw_dir, store_path, listing, cfg, embeddings)
        with tqdm(total=len(listing), desc=f"preprocess {dataset}", unit="scene",
                  disable=not cfg.show_progress) as bar:
            for summary in scene_results(futures):
                summaries[summary.scene_id] = summary
                bar.set_postfix_str(f"{summary.scene_id}: {summary.status}")
                bar.update(1)
    return [summaries[s] for s in listing]
