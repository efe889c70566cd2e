"""Dask clusters named by class path: a real LocalCluster through the same code path as SLURM."""

from __future__ import annotations

import pytest
from distributed import LocalCluster

from preprocessing.clusters import ClusterSpec, cluster_class, cluster_client
from storage.errors import InputError


def test_cluster_class_by_dotted_path():
    assert cluster_class("distributed.LocalCluster") is LocalCluster


@pytest.mark.parametrize("path, message", [
    ("LocalCluster", "dotted path"),
    ("no_such_module_xyz.Cluster", "cannot import no_such_module_xyz"),
    ("distributed.Client", "not a Dask cluster class"),
    ("distributed.NoSuchCluster", "not a Dask cluster class"),
])
def test_bad_cluster_classes(path, message):
    with pytest.raises(InputError, match=message):
        cluster_class(path)


def test_local_cluster_scaled_to_jobs_runs_tasks():
    kwargs = {"n_workers": 0, "processes": False, "threads_per_worker": 1, "dashboard_address": None}
    spec = ClusterSpec("distributed.LocalCluster", kwargs, jobs=2)
    with cluster_client(spec) as client:
        client.wait_for_workers(2, timeout=60)
        assert sorted(client.gather(client.map(lambda x: x * x, range(5)))) == [0, 1, 4, 9, 16]
        assert len(client.scheduler_info()["workers"]) == 2


def test_bad_keyword_arguments():
    spec = ClusterSpec("distributed.LocalCluster", {"n_workers": 1, "processes": False, "no_such_option": 1})
    with pytest.raises(InputError, match="cannot start it with keyword arguments") as info:
        with cluster_client(spec):
            pass
    assert "\n" not in str(info.value)


def test_slurm_example_of_the_docs_builds_its_job_script():
    """The SLURM example of docs/operations.md: SLURMCluster takes these kwargs and writes the
    sbatch script (nothing is submitted: no jobs are asked for)."""
    pytest.importorskip("dask_jobqueue")
    kwargs = {"queue": "cpu", "account": "proj123", "cores": 8, "processes": 8, "memory": "32GiB",
              "walltime": "02:00:00", "job_extra_directives": ["--constraint=ssd"],
              "job_script_prologue": ["source /shared/xmask3d/.venv/bin/activate"],
              "worker_extra_args": ["--nthreads", "1"], "scheduler_options": {"dashboard_address": None}}
    cluster = cluster_class("dask_jobqueue.SLURMCluster")(**kwargs)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p cpu", "#SBATCH -A proj123", "#SBATCH --cpus-per-task=8", "#SBATCH -t 02:00:00",
                 "#SBATCH --constraint=ssd", "source /shared/xmask3d/.venv/bin/activate"):
        assert line in script, script
    assert "--nworkers 8" in script and "--nthreads 1" in script
