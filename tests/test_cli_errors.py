"""The command line's failures: one line on stderr, exit 2 for bad input (1 otherwise), nothing left
on disk, the traceback only with ``-v``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from xmask3d import cli

XMASK3D = str(Path(sys.executable).with_name("xmask3d"))


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([XMASK3D, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_missing_raw_dir_is_one_error_line_and_exit_2(tmp_path):
    result = run("preprocess", "scannet", "--raw", "/nope", "--out", "out.zarr", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: raw dir /nope does not exist"]
    assert list(tmp_path.iterdir()) == []  # no store, no MLflow or Prefect files in the working dir


def test_verbose_shows_the_traceback(tmp_path):
    result = run("-v", "preprocess", "scannet", "--raw", "/nope", "--out", "out.zarr", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "InputError: raw dir /nope does not exist" in result.stderr


def test_evaluate_with_a_bad_model_leaves_no_mlflow_database(tmp_path):
    store = tmp_path / "store.zarr"
    store.mkdir()
    result = run("evaluate", "--store", str(store), "--benchmark", "scannet20-b15n4",
                 "--model", "models:/xmask3d-scannet20-b15n4@champion", cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: sqlite:///mlruns.db: no MLflow database")
    result = run("evaluate", "--store", str(store), "--benchmark", "scannet20-b15n4",
                 "--model", "runs/none/last.pt", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: runs/none/last.pt: checkpoint not found"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]  # no mlruns.db, no mlartifacts


def test_train_checks_store_and_benchmark_before_importing_the_model(tmp_path):
    result = run("train", "--store", "missing.zarr", "--benchmark", "scannet20-b15n4", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: store missing.zarr does not exist"]
    (tmp_path / "s.zarr").mkdir()
    result = run("train", "--store", "s.zarr", "--benchmark", "scannet99", cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: unknown benchmark 'scannet99'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_an_unexpected_error_is_one_line_and_exit_1(monkeypatch, tmp_path):
    import preprocessing.synthetic

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(preprocessing.synthetic, "write_scannet", broken)
    monkeypatch.setitem(cli.OPTIONS, "verbose", False)
    result = CliRunner().invoke(cli.app, ["synth", "scannet", str(tmp_path / "raw")])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "error: RuntimeError: disk on fire (xmask3d -v ... shows the traceback)"]


def test_the_cli_default_tracking_uri_is_the_tracking_modules():
    from xmask3d.engine import tracking

    assert cli.DEFAULT_TRACKING_URI == tracking.DEFAULT_TRACKING_URI


def test_train_options_override_the_presets_recipe(monkeypatch, tmp_path):
    from xmask3d.engine import train as engine_train

    seen = {}

    def capture(store, benchmark, preset, cfg, **kwargs):
        seen[preset] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(engine_train, "train", capture)
    (tmp_path / "s.zarr").mkdir()
    common = ["train", "--store", str(tmp_path / "s.zarr"), "--benchmark", "scannet20-b15n4",
              "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    CliRunner().invoke(cli.app, [*common, "--preset", "paper", "--amp", "--batch-size", "4", "--compile"])
    CliRunner().invoke(cli.app, [*common, "--preset", "small"])
    CliRunner().invoke(cli.app, [*common, "--preset", "tiny", "--no-amp"])
    assert (seen["paper"].amp, seen["paper"].batch_size, seen["paper"].compile, seen["paper"].epochs) == \
        (True, 4, True, 150)
    assert (seen["small"].amp, seen["small"].batch_size, seen["small"].compile) == (True, 8, False)
    assert seen["tiny"].amp is False
