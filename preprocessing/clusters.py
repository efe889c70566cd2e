"""Dask clusters named by their class: ``"dask_jobqueue.SLURMCluster"`` + keyword arguments.

HPC schedulers (SLURM, PBS, SGE, LSF, HTCondor) are Dask clusters in ``dask_jobqueue``; a cloud or
Kubernetes cluster is another package's class. The preprocess flow (``cluster_class``,
``cluster_kwargs``, ``cluster_jobs``) and ``preprocessing.run`` take the class as a dotted path (a
flow parameter is a string, not a class) and its keyword arguments as a dict, so one deployment
runs on any of them; ``"distributed.LocalCluster"`` is the same code path on one machine (tests).
docs/operations.md has a SLURM example.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from distributed import Client
from distributed.deploy import Cluster

from storage.errors import InputError


@dataclass(frozen=True)
class ClusterSpec:
    """A Dask cluster to start: ``cls`` is ``"module.Class"``; ``jobs`` > 0 scales it to that many
    workers (jobqueue: job slots), ``adapt_max`` > 0 lets it adapt between ``jobs`` and that many."""

    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    jobs: int = 0
    adapt_max: int = 0


def cluster_class(path: str) -> type[Cluster]:
    """Import the Dask cluster class named ``module.Class`` (one line InputError when it is not one)."""
    module_name, _, class_name = path.rpartition(".")
    if not module_name or not class_name:
        raise InputError(f"cluster class {path!r}: give a dotted path such as dask_jobqueue.SLURMCluster")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        hint = " (pip install dask-jobqueue, or the extra xmask3d-pipeline[hpc])" \
            if module_name.startswith("dask_jobqueue") else ""
        raise InputError(f"cluster class {path!r}: cannot import {module_name} ({error}){hint}") from error
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, Cluster):
        raise InputError(f"cluster class {path!r}: not a Dask cluster class")
    return cls


def start_cluster(spec: ClusterSpec) -> Cluster:
    """Start the cluster of ``spec`` and ask it for its workers (they may arrive later: a queue)."""
    cls = cluster_class(spec.cls)
    try:
        cluster = cls(**spec.kwargs)
    except Exception as error:  # unknown keywords fail here, or in the workers it starts (RuntimeError)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cluster class {spec.cls}: cannot start it with keyword arguments "
                         f"{sorted(spec.kwargs)} ({first})") from error
    if spec.adapt_max > 0:
        cluster.adapt(minimum=spec.jobs, maximum=spec.adapt_max)
    elif spec.jobs > 0:
        cluster.scale(spec.jobs)
    return cluster


@contextmanager
def cluster_client(spec: ClusterSpec) -> Iterator[Client]:
    """A client of a freshly started cluster; the cluster (and its jobs) stop on exit."""
    cluster = start_cluster(spec)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()
