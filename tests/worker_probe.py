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
    """Peak resident set size of this process, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
