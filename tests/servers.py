"""Helpers for tests that start real servers: a free port, waiting for health, stopping by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def wait_healthy(health_url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Poll ``health_url`` until it answers 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout}s:\n{tail(log)}")


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a process we started, by pid: SIGTERM, then SIGINT, then SIGKILL (each with a timeout).

    A process started with ``start_new_session=True`` is signalled with its whole process group,
    so the workers it forked stop too.
    """
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    """A real S3-compatible server (moto's server mode) on a free port of 127.0.0.1, healthy.

    Returns the process (stop it with ``stop``) and its endpoint URL; the server keeps its
    buckets in memory, so stopping it deletes everything.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"{endpoint}/moto-api/", proc, log, timeout=60)
    except BaseException:
        stop(proc)
        raise
    return proc, endpoint


def s3_environment(endpoint: str, home: Path) -> dict[str, str]:
    """Environment variables that point every AWS SDK (boto3, s3fs, obstore) at ``endpoint``.

    Fixed test credentials (moto accepts any); the user's ~/.aws files are hidden.
    """
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "xmask3d-test-key",
        "AWS_SECRET_ACCESS_KEY": "xmask3d-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "aws-config-absent"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials-absent"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
