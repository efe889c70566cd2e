"""Shared fixtures: synthetic raw datasets (built once per session), a preprocessed store, one
temporary Prefect API and one moto S3 server per session.

Tests never touch the user's Prefect home or MLflow store: Prefect gets a temporary home for the
whole session (set before Prefect reads its settings), MLflow tests pass temporary sqlite URIs.
"""

import os
import tempfile

import pytest

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="xmask3d-test-prefect-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Busy-waiting OpenMP threads slow torch/spconv 10-50x when pytest shares the cores with Dask workers.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tests.fixtures_data import *  # noqa: E402,F401,F403
from tests.fixtures_prefect import *  # noqa: E402,F401,F403
from tests.fixtures_s3 import *  # noqa: E402,F401,F403
from tests.fixtures_store import *  # noqa: E402,F401,F403


@pytest.fixture(autouse=True)
def _no_leaked_mlflow_uris():
    """mlflow.set_tracking_uri / set_registry_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI;
    without this, a later test's subprocesses (Prefect workers, the CLI) would log into an earlier
    test's database."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
