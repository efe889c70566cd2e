"""Shared fixtures: synthetic raw datasets (built once per session) and a preprocessed store."""

from tests.fixtures_data import *  # noqa: F401,F403
from tests.fixtures_store import *  # noqa: F401,F403
