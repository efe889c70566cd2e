"""End to end against a real Prefect server: deploy --all, a process worker, preprocess/scannet.

Starts ``prefect server start`` on a free port with a temporary PREFECT_HOME, creates the process
work pool ``local``, registers every deployment of prefect.yaml with ``prefect deploy --all`` from
the repository root, starts ``prefect worker start --pool local``, serves a synthetic raw ScanNet
dataset over HTTP (so the flow's download task is real), and runs ``prefect deployment run
preprocess/scannet --watch``. Checks go through the server's REST API: final states, state
messages, logs and artifacts. Worker and server are stopped by pid (TERM, then INT, then KILL).
"""

from __future__ import annotations

import json
import os
import re
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


class PrefectStack:
    """A running server + worker with the deployments registered; CLI and REST helpers."""

    def __init__(self, home: Path, api: str, env: dict[str, str]):
        self.home, self.api, self.env = home, api, env
        self.http = httpx.Client(base_url=api, timeout=30)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def logs_of_services(self) -> str:
        return (f"--- server log ---\n{tail(self.home / 'server.log')}\n"
                f"--- worker log ---\n{tail(self.home / 'worker.log')}")

    def run_deployment(self, name: str, params: dict) -> tuple[subprocess.CompletedProcess, str]:
        """``prefect deployment run NAME --params JSON --watch``; returns the result and the flow run id."""
        result = self.cli("deployment", "run", name, "--params", json.dumps(params), "--watch",
                          "--watch-timeout", "400", timeout=450)
        found = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
        assert found, f"no flow run id in:\n{result.stdout}\n{result.stderr}\n{self.logs_of_services()}"
        return result, found.group(1)

    def flow_run(self, flow_run_id: str) -> dict:
        response = self.http.get(f"/flow_runs/{flow_run_id}")
        response.raise_for_status()
        return response.json()

    def logs(self, flow_run_id: str) -> list[str]:
        response = self.http.post("/logs/filter", json={
            "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200})
        response.raise_for_status()
        return [entry["message"] for entry in response.json()]

    def artifact(self, flow_run_id: str, key: str) -> dict:
        response = self.http.post("/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": [key]}}})
        response.raise_for_status()
        found = response.json()
        assert found, f"no artifact {key!r} in flow run {flow_run_id}"
        return found[0]


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
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
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "COLUMNS": "250",
    })
    procs: list[subprocess.Popen] = []
    try:
        with open(home / "server.log", "w") as log:
            command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
            server = subprocess.Popen(command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(server)
        wait_healthy(f"{api}/health", server, home / "server.log")
        stack = PrefectStack(home, api, env)

        pool = stack.cli("work-pool", "create", "local", "--type", "process")
        assert pool.returncode == 0, pool.stdout + pool.stderr
        deploy = stack.cli("--no-prompt", "deploy", "--all")
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr

        with open(home / "worker.log", "w") as log:
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "local"], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
        procs.append(worker)
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
    assert all(d["work_pool_name"] == "local" for d in deployments)
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
    assert token not in tail(prefect_stack.home / "server.log", 10**9)
    assert token not in tail(prefect_stack.home / "worker.log", 10**9)

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
    result, run_id = prefect_stack.run_deployment(
        "preprocess/scannet", {"raw_dir": str(missing), "store": str(tmp_path / "a.zarr")})
    assert result.returncode == 1
    state = prefect_stack.flow_run(run_id)["state"]
    assert state["type"] == "FAILED"
    assert f"raw dir {missing} does not exist" in state["message"]

    result, run_id = prefect_stack.run_deployment(
        "preprocess/scannet", {"raw_dir": str(synthetic_scannet), "store": str(tmp_path / "b.zarr"),
                               "scenes": ["scene0999_00"]})
    assert result.returncode == 1
    state = prefect_stack.flow_run(run_id)["state"]
    assert state["type"] == "FAILED"
    assert "unknown scenes scene0999_00" in state["message"]
    assert not (tmp_path / "b.zarr").exists()  # inputs are checked before the store is created
