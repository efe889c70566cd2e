"""prefect.yaml without a server: every deployment's default parameters are valid for its flow,
the chains of deployments agree on their paths, and each deployment is in the right work pool."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import validate

from storage.benchmarks import BENCHMARK_NAMES
from xmask3d.network.config import PRESETS

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
POOL = {"preprocess": "cpu", "retrain": "cpu", "train": "gpu", "evaluate": "gpu", "ablate": "gpu"}


def _flow(entrypoint: str):
    module, name = entrypoint.split(":")
    return getattr(importlib.import_module(module), name)


def _by_name() -> dict[str, dict]:
    return {_id(d): d for d in DEPLOYMENTS}


def _id(deployment: dict) -> str:
    return f"{deployment['entrypoint'].split(':')[1]}/{deployment['name']}"


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=_id)
def test_default_parameters_pass_the_flows_parameter_validation(deployment):
    flow = _flow(deployment["entrypoint"])
    params = deployment.get("parameters") or {}
    # what the server checks when it creates a run (enforce_parameter_schema) ...
    schema = parameter_schema(flow.fn).model_dump_for_openapi()
    validate(params, schema, raise_on_error=True)
    # ... and what the flow checks when the run starts (pydantic, with the required arguments)
    flow.validate_parameters(params)
    if "benchmark" in params:
        assert params["benchmark"] in BENCHMARK_NAMES
    if "preset" in params:
        assert params["preset"] in PRESETS


def test_pools_split_cpu_and_gpu_work():
    for name, deployment in _by_name().items():
        assert deployment["work_pool"]["name"] == POOL[name.split("/")[0]], name


def test_retrain_schedule_trains_the_paper_preset_on_what_preprocess_downloads():
    deployments = _by_name()
    retrain = deployments["retrain/scannet20-b15n4"]["parameters"]
    preprocess = deployments["preprocess/scannet"]["parameters"]
    assert retrain["preset"] == "paper"
    assert retrain["raw_dir"] == preprocess["raw_dir"]  # the raw scenes the preprocess deployment fetches
    assert retrain["sd_dir"] and retrain["clip_checkpoint"]  # the paper preset's local weights
    assert deployments["retrain/scannet20-b15n4"]["schedules"][0]["cron"]
    for name, deployment in deployments.items():  # the CPU chain trains on the store preprocess writes
        params = deployment["parameters"]
        kind = name.split("/")[0]
        if kind in ("train", "evaluate", "ablate") and params["benchmark"].startswith("scannet"):
            assert params["store"] == preprocess["store"], name
