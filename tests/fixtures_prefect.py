"""One temporary Prefect API (``prefect_test_harness``: a real server on a free port with its own
database) for every in-process flow test of the session, since it takes seconds to start.

The server-and-worker path (``prefect server start``, workers, deployments) is in test_prefect_e2e.py.
"""

import pytest


@pytest.fixture(scope="session")
def prefect_api():
    """The session's temporary Prefect API; flows called in this process run against it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
