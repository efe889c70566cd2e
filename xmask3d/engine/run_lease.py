"""One process trains an MLflow run at a time, and a run whose training process died ends KILLED.

The training lease of a run is ``<checkpoint_dir>/<run_id>/.train.lock``, the same lease as the
store's writer lock (``storage.lease``: owner token, host, pid and its start time, a heartbeat;
taken over when its process is gone). docs/training.md, "Checkpoints and resuming".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.lease import Lease

RUN_LEASE_NAME = ".train.lock"  # held while a process trains the run


def end_abandoned_runs(client: Any, experiment_id: str, checkpoint_root: Path, current: str) -> list[str]:
    """Mark KILLED the runs of the experiment left RUNNING by a training process that is gone.

    A process killed with SIGKILL (or a lost machine) cannot end its MLflow run, which then shows
    RUNNING for ever. Such a run is recognised by its training lease in this checkpoint directory:
    the lease file is there and names a process that no longer runs. The lease is held while the
    status changes, so a resume of that run at the same moment fails naming the holder instead of
    both changing the run. Runs without a lease file here (another machine's, or older) are left
    alone. Returns the ended run ids.
    """
    ended = []
    for found in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        run_id = found.info.run_id
        lock = checkpoint_root / run_id / RUN_LEASE_NAME
        if run_id == current or not lock.is_file():
            continue
        lease = Lease(lock, f"end abandoned MLflow run {run_id}")
        if lease.try_acquire() is not None:  # a live process trains it
            continue
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "ended.reason", f"training process gone; found by run {current}")
                client.set_terminated(run_id, status="KILLED")
                ended.append(run_id)
        finally:
            lease.release()
    return ended


def hold_run(checkpoint_root: Path, run_id: str) -> Lease:
    """The training lease of MLflow run ``run_id`` (``<checkpoint_dir>/<run_id>/.train.lock``).

    One process trains a run at a time: a second ``train`` resuming the same run (a double start, a
    retried flow run whose first attempt still trains) would log the same steps twice and overwrite
    the first's checkpoints. It fails with one line naming the owner (pid, host, since when). A
    lease whose process is gone (SIGKILL, power loss) is taken over, which is what a resume after a
    kill does. The lease is local to the checkpoint directory's file system.
    """
    directory = checkpoint_root / run_id
    directory.mkdir(parents=True, exist_ok=True)
    return Lease(directory / RUN_LEASE_NAME, f"train MLflow run {run_id}").acquire(
        what=f"MLflow run {run_id} (checkpoints {directory})")
