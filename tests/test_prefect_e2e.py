"""End to end against a real Prefect server: deploy --all, a worker per work pool, the pipeline.

Starts ``prefect server start`` on a free port with a temporary PREFECT_HOME, creates the process
work pools ``cpu`` and ``gpu``, registers every deployment of prefect.yaml with ``prefect deploy
--all`` from a temporary project directory holding a copy of prefect.yaml (the build step makes it
the flow runs' working directory, so the deployments' default relative paths ``data/...`` and
``sqlite:///mlruns.db`` land there), and starts one worker per pool (``cpu-worker``,
``gpu-worker``). It serves a synthetic raw ScanNet dataset over HTTP (so the flow's download task
is real) and runs deployments with ``prefect deployment run ... --watch``: preprocess -> train ->
evaluate with the default parameters, then retrain, which hands training and evaluation to the gpu
pool. Runs that write nothing in common go side by side to save wall time (each flow run's
start-up, mostly imports, takes seconds); runs that log to the one SQLite MLflow database do not.
Checks go through the server's REST API (final states, state messages, logs, artifacts, which
worker submitted each flow run) and the MLflow registry. Workers and server are stopped by pid
(TERM, then INT, then KILL).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.http_server import serve_directory
from tests.servers import free_port, stop, tail, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
SCENES = ["scene0000_00", "scene0001_00"]
POOLS = ("cpu", "gpu")
POOL_OF = {"preprocess": "cpu", "retrain": "cpu", "train": "gpu", "evaluate": "gpu", "ablate": "gpu"}
MODEL = "xmask3d-scannet20-b15n4"
# A model that clears the promotion rule on the 3-scene synthetic data (64 steps with region
# captions; 24 steps gave fused mIoU over all classes 4.3 % against the majority-class baseline's
# 4.5 %, so too few), and one that cannot: the random init (lr 0, one step: 0.6 %).
GOOD_TRAIN = {"train_config": {"max_steps": 64}, "caption_supervision": "region"}
WORSE_TRAIN = {"max_steps": 1, "lr_3d": 0.0, "lr_other": 0.0}


def finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for a CLI process started with pipes; stopped by pid (and the test failed) past ``timeout``."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


class PrefectStack:
    """A running server + worker with the deployments registered; CLI and REST helpers."""

    def __init__(self, home: Path, project: Path, api: str, env: dict[str, str]):
        self.home, self.project, self.api, self.env = home, project, api, env
        self.http = httpx.Client(base_url=api, timeout=30)

    def start_cli(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([PREFECT, *args], cwd=self.project, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return finish(self.start_cli(*args), timeout)

    def logs_of_services(self) -> str:
        return "\n".join(f"--- {name} ---\n{tail(self.home / name)}"
                         for name in ("server.log", "cpu-worker.log", "gpu-worker.log"))

    def run_deployment(self, name: str, params: dict) -> tuple[subprocess.CompletedProcess, str]:
        """``prefect deployment run NAME --params JSON --watch``; returns the result and the flow run id."""
        [done] = self.run_deployments((name, params))
        return done

    def run_deployments(self, *runs: tuple[str, dict]) -> list[tuple[subprocess.CompletedProcess, str]]:
        """Several ``prefect deployment run ... --watch`` at once (the worker runs their flow runs side
        by side); the result and flow run id of each, in order."""
        procs = [self.start_cli("deployment", "run", name, *(["--params", json.dumps(p)] if p else []),
                                "--watch", "--watch-timeout", "500")
                 for name, p in runs]
        try:
            results = [finish(proc, 550) for proc in procs]
        finally:
            for proc in procs:
                stop(proc)
        done = []
        for result in results:
            found = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
            assert found, f"no flow run id in:\n{result.stdout}\n{result.stderr}\n{self.logs_of_services()}"
            done.append((result, found.group(1)))
        return done

    def flow_run(self, flow_run_id: str) -> dict:
        response = self.http.get(f"/flow_runs/{flow_run_id}")
        response.raise_for_status()
        return response.json()

    def logs(self, flow_run_id: str) -> list[str]:
        messages: list[str] = []
        while True:  # the API answers at most 200 entries per request
            response = self.http.post("/logs/filter", json={
                "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200,
                "offset": len(messages)})
            response.raise_for_status()
            page = [entry["message"] for entry in response.json()]
            messages += page
            if len(page) < 200:
                return messages

    def artifact(self, flow_run_id: str, key: str) -> dict:
        response = self.http.post("/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": [key]}}})
        response.raise_for_status()
        found = response.json()
        assert found, f"no artifact {key!r} in flow run {flow_run_id}"
        return found[0]

    def worker_of(self, flow_run_id: str) -> str:
        """The worker that submitted the flow run (the worker's own line in the run's logs)."""
        for line in self.logs(flow_run_id):
            found = re.match(r"Worker '([^']+)' submitting flow run", line)
            if found:
                return found.group(1)
        raise AssertionError(f"no worker submitted flow run {flow_run_id}")

    def assert_completed(self, result: subprocess.CompletedProcess, flow_run_id: str) -> None:
        state = self.flow_run(flow_run_id)["state"]
        assert result.returncode == 0 and state["type"] == "COMPLETED", (
            f"{state}\n{result.stdout}\n{result.stderr}\n{self.logs_of_services()}")


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    project = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # a scheduled run waits <= 1 s for its worker
        "COLUMNS": "250",
    })
    procs: list[subprocess.Popen] = []
    try:
        with open(home / "server.log", "w") as log:
            command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
            server = subprocess.Popen(command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(server)
        wait_healthy(f"{api}/health", server, home / "server.log")
        stack = PrefectStack(home, project, api, env)

        # the pools, then (while the workers start up) the deployments; CLI processes side by side
        creating = [stack.start_cli("work-pool", "create", name, "--type", "process") for name in POOLS]
        procs += creating
        for pool in [finish(proc, 300) for proc in creating]:
            assert pool.returncode == 0, pool.stdout + pool.stderr
        for pool_name in POOLS:
            with open(home / f"{pool_name}-worker.log", "w") as log:
                worker = subprocess.Popen(
                    [PREFECT, "worker", "start", "--pool", pool_name, "--name", f"{pool_name}-worker"],
                    cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
            procs.append(worker)
        deploy = stack.cli("--no-prompt", "deploy", "--all")
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        yield stack
    finally:
        for proc in reversed(procs):
            stop(proc)


def test_deploy_all_registers_every_deployment(prefect_stack):
    response = prefect_stack.http.post("/deployments/filter", json={"limit": 200})
    response.raise_for_status()
    deployments = response.json()
    flows = {f["id"]: f["name"] for f in prefect_stack.http.post("/flows/filter", json={}).json()}
    names = {f"{flows[d['flow_id']]}/{d['name']}" for d in deployments}
    from storage.benchmarks import BENCHMARK_NAMES

    expected = {"preprocess/scannet", "preprocess/s3dis", "retrain/scannet20-b15n4"}
    expected |= {f"{kind}/{b}" for kind in ("train", "evaluate") for b in BENCHMARK_NAMES}
    assert expected <= names, f"missing: {expected - names}"
    for deployment in deployments:
        assert deployment["work_pool_name"] == POOL_OF[flows[deployment["flow_id"]]], deployment["name"]
    retrain = next(d for d in deployments if flows[d["flow_id"]] == "retrain")
    schedules = [s["schedule"] for s in retrain["schedules"]]
    assert schedules and schedules[0]["cron"] == "0 3 * * 1" and schedules[0]["timezone"]


def test_preprocess_deployment_downloads_stores_and_skips_on_rerun(prefect_stack, synthetic_scannet,
                                                                   tmp_path):
    raw, store = tmp_path / "raw", tmp_path / "scannet.zarr"
    token = "personal-t0ken-5e1f"  # the personal URL's secret part, kept in a Prefect Secret block
    with serve_directory(Path(synthetic_scannet)) as url:
        secret = subprocess.run(
            [sys.executable, "-c", "import os; from prefect.blocks.system import Secret; "
             "Secret(value=os.environ['URL']).save('scannet-url', overwrite=True)"],
            env={**prefect_stack.env, "URL": f"{url}/?key={token}"}, capture_output=True, text=True,
            timeout=120)
        assert secret.returncode == 0, secret.stderr
        params = {"url_from": "secret:scannet-url", "raw_dir": str(raw), "store": str(store),
                  "scenes": SCENES, "workers": 1}
        result, run_id = prefect_stack.run_deployment("preprocess/scannet", params)
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{prefect_stack.logs_of_services()}"
    flow_run = prefect_stack.flow_run(run_id)
    assert flow_run["state"]["type"] == "COMPLETED"
    # the token is nowhere in the server's database (runs, parameters, logs, events) nor in its logs
    stored = b"".join(p.read_bytes() for p in prefect_stack.home.glob("*.db*"))
    assert str(raw).encode() in stored  # the database does hold this run's parameters
    assert token.encode() not in stored
    for log in ("server.log", "cpu-worker.log", "gpu-worker.log"):
        assert (prefect_stack.home / log).is_file(), log
        assert token not in tail(prefect_stack.home / log, 10**9), log

    # the download was real: the raw files are there, and the store holds both scenes
    assert all((raw / "scans" / s / f"{s}.sens").is_file() for s in SCENES)
    from storage.store import open_store

    assert sorted(open_store(store).scene_ids()) == SCENES
    table = json.loads(prefect_stack.artifact(run_id, "preprocess-scannet-scenes")["data"])
    assert [(row["scene"], row["status"]) for row in table] == [(s, "written") for s in SCENES]
    assert all(row["points"] > 0 and row["frames_kept"] > 0 for row in table)
    prefect_stack.artifact(run_id, "preprocess-scannet-summary")

    # a re-run (no download this time) skips the complete scenes, visibly in the logs
    params = {"raw_dir": str(raw), "store": str(store), "scenes": SCENES, "workers": 1}
    result, rerun_id = prefect_stack.run_deployment("preprocess/scannet", params)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{prefect_stack.logs_of_services()}"
    assert prefect_stack.flow_run(rerun_id)["state"]["type"] == "COMPLETED"
    logs = "\n".join(prefect_stack.logs(rerun_id))
    for scene in SCENES:
        assert f"skipped scene {scene} (complete in store)" in logs


def test_bad_raw_dir_and_unknown_scene_fail_with_the_message(prefect_stack, synthetic_scannet, tmp_path):
    missing = tmp_path / "no-such-dir"
    (result, run_id), (unknown, unknown_id) = prefect_stack.run_deployments(  # side by side
        ("preprocess/scannet", {"raw_dir": str(missing), "store": str(tmp_path / "a.zarr")}),
        ("preprocess/scannet", {"raw_dir": str(synthetic_scannet), "store": str(tmp_path / "b.zarr"),
                                "scenes": ["scene0999_00"]}))
    assert result.returncode == 1
    state = prefect_stack.flow_run(run_id)["state"]
    assert state["type"] == "FAILED"
    assert f"raw dir {missing} does not exist" in state["message"]

    assert unknown.returncode == 1
    state = prefect_stack.flow_run(unknown_id)["state"]
    assert state["type"] == "FAILED"
    assert "unknown scenes scene0999_00" in state["message"]
    assert not (tmp_path / "b.zarr").exists()  # inputs are checked before the store is created


def test_pipeline_with_default_parameters_promotes_only_the_better_model(prefect_stack, synthetic_scannet):
    from mlflow import MlflowClient

    stack, project = prefect_stack, prefect_stack.project
    shutil.copytree(synthetic_scannet, project / "data" / "raw" / "scannet")
    mlflow = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns.db'}",
                          registry_uri=f"sqlite:///{project / 'mlruns.db'}")

    # preprocess/scannet with every default: data/raw/scannet -> data/scannet.zarr
    result, preprocess_id = stack.run_deployment("preprocess/scannet", {})
    stack.assert_completed(result, preprocess_id)
    assert (project / "data" / "scannet.zarr" / "zarr.json").is_file()

    # train/scannet20-b15n4 on the defaults (store, benchmark, preset), a few steps: the champion
    result, train_id = stack.run_deployment("train/scannet20-b15n4", GOOD_TRAIN)
    stack.assert_completed(result, train_id)
    train_logs = "\n".join(stack.logs(train_id))
    assert "version 1: champion" in train_logs, train_logs[-6000:]
    champion = mlflow.get_model_version_by_alias(MODEL, "champion")
    assert champion.tags["promotion"] == "champion" and champion.tags["promotion.metric"] == "fused/hiou"
    assert "no champion yet" in champion.tags["promotion.reason"]

    # evaluate/scannet20-b15n4 with every default evaluates the promoted champion (not side by side
    # with retrain: both would write the one SQLite MLflow database at once)
    result, evaluate_id = stack.run_deployment("evaluate/scannet20-b15n4", {})
    stack.assert_completed(result, evaluate_id)
    logs = "\n".join(stack.logs(evaluate_id))
    assert f"models:/{MODEL}@champion on scannet20-b15n4" in logs and "no champion" not in logs
    experiment = mlflow.get_run(champion.run_id).info.experiment_id
    [evaluation] = mlflow.search_runs([experiment], f"tags.mlflow.parentRunId = '{champion.run_id}'")
    assert evaluation.data.tags["model"] == f"models:/{MODEL}@champion"

    # retrain (on the cpu pool) hands a deliberately worse model's training and evaluation to the
    # gpu pool; the promotion rule keeps the champion and says why on the new version
    params = {"preset": "tiny", "store": "data/scannet.zarr", "sd_dir": None, "clip_checkpoint": None,
              "train_config": WORSE_TRAIN}
    result, retrain_id = stack.run_deployment("retrain/scannet20-b15n4", params)
    stack.assert_completed(result, retrain_id)
    logs = "\n".join(stack.logs(retrain_id))
    pattern = r"deployment (train|evaluate)/scannet20-b15n4: flow run \S+ \(([0-9a-f-]{36})\)"
    children = dict(re.findall(pattern, logs))
    assert set(children) == {"train", "evaluate"}, logs
    assert stack.worker_of(preprocess_id) == stack.worker_of(retrain_id) == "cpu-worker"
    for flow_run_id in (train_id, evaluate_id, children["train"], children["evaluate"]):
        assert stack.worker_of(flow_run_id) == "gpu-worker"
    assert stack.flow_run(children["train"])["parent_task_run_id"]  # shown under retrain in the UI

    new = mlflow.get_model_version_by_alias(MODEL, "candidate")
    assert int(new.version) > int(champion.version)
    assert mlflow.get_model_version_by_alias(MODEL, "champion").version == champion.version
    assert new.tags["promotion"] == "candidate"
    assert "majority-class baseline" in new.tags["promotion.reason"], new.tags
    assert f"version {new.version}: candidate" in logs
    markdown = stack.artifact(retrain_id, "retrain-scannet20-b15n4")["data"]
    assert "**candidate**" in markdown and "champion unchanged (not better)" not in markdown
