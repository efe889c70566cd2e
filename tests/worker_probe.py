"""Functions the tests run on Dask workers (via ``client.run``): standard library only, so
running them imports nothing into the worker."""

from __future__ import annotations

import resource
import sys

HEAVY_MODULES = ("torch", "transformers", "sentence_transformers", "open_clip", "prefect", "prefect_dask")


def heavy_modules() -> list[str]:
    """The heavy modules this process has imported."""
    return sorted(m for m in HEAVY_MODULES if m in sys.modules)


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own address space, MB.

    ``VmHWM`` (Linux): ``ru_maxrss`` survives ``exec``, so in a worker process started by fork +
    exec it reports the parent's size at the fork, not the worker's.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
