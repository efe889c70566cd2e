"""Shared fixtures: synthetic raw datasets (built once per session) and a preprocessed store.

Tests never touch the user's Prefect home or MLflow store: Prefect gets a temporary home for the
whole session (set before Prefect reads its settings), MLflow tests pass temporary sqlite URIs.
"""

import os
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="xmask3d-test-prefect-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Busy-waiting OpenMP threads slow torch/spconv 10-50x when pytest shares the cores with Dask workers.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tests.fixtures_data import *  # noqa: E402,F401,F403
from tests.fixtures_s3 import *  # noqa: E402,F401,F403
from tests.fixtures_store import *  # noqa: E402,F401,F403
