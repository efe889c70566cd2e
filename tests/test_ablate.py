"""The ablation study: variant names, the comparison table, switch checks on resume, the CLI's bad
input, and (slow) the ablate flow on the tiny preset with two variants."""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from storage.errors import InputError
from xmask3d.cli import app
from xmask3d.engine.ablate import (
    DEFAULT_VARIANTS,
    VariantResult,
    resolve_variants,
    table_csv,
    table_markdown,
    table_rows,
)

BENCH = "scannet20-b15n4"


def test_default_variants_are_full_and_each_switch_off_alone():
    assert resolve_variants(None) == ["full", "no-implicit-condition", "no-mask-regularization", "no-fusion",
                                      "no-binary-head", "no-caption-losses"]
    assert list(DEFAULT_VARIANTS) == resolve_variants(None)
    assert resolve_variants("full, no-binary-head+no-fusion") == ["full", "no-fusion+no-binary-head"]
    with pytest.raises(InputError, match="unknown ablation variant 'no-wings'"):
        resolve_variants(["full", "no-wings"])
    with pytest.raises(InputError, match="more than once"):
        resolve_variants(["no-fusion", "no-fusion"])


def test_table_rows_markdown_and_csv():
    metrics = {f"{h}/{k}": v for h in ("3d", "2d", "fused")
               for k, v in (("hiou", 0.5), ("miou_base", 0.6), ("miou_novel", 0.4291))}
    metrics["2d/miou_novel"] = float("nan")
    results = [VariantResult("full", {}, "r1", "a.pt", 1000, 3, metrics),
               VariantResult("no-fusion", {"fusion": False}, "r2", "b.pt", 900, 3, metrics)]
    rows = table_rows(results)
    assert [r["variant"] for r in rows] == ["full", "no-fusion"]
    assert rows[1]["fusion"] == "off" and rows[1]["binary_head"] == "on" and rows[0]["fusion"] == "on"
    assert rows[0]["fused hIoU"] == 50.0 and rows[0]["3d mIoU novel"] == 42.9
    assert rows[0]["2d mIoU novel"] is None and rows[1]["parameters"] == 900
    markdown = table_markdown(rows, BENCH, "tiny")
    line = next(x for x in markdown.splitlines() if x.startswith("| `no-fusion`"))
    assert line.split(" | ")[1:7] == ["✓", "✓", "✗", "✓", "✓", "900"]
    assert "–" in line  # undefined score
    parsed = list(csv.DictReader(io.StringIO(table_csv(rows))))
    assert [p["run_id"] for p in parsed] == ["r1", "r2"] and parsed[0]["fused mIoU base"] == "60.0"
    assert parsed[0]["2d mIoU novel"] == ""


def _no_fit(*args, **kwargs):
    raise AssertionError("training started although the input is bad")


def test_resume_with_other_switches_fails_before_training(synthetic_store, tmp_path, monkeypatch):
    from dataclasses import asdict

    from xmask3d.engine import train as train_mod
    from xmask3d.engine.checkpoint import save_checkpoint
    from xmask3d.network.config import preset

    monkeypatch.setattr(train_mod, "fit", _no_fit)
    ckpt = save_checkpoint(tmp_path / "full" / "last.pt", {
        "model": {}, "preset": "tiny", "benchmark": BENCH, "model_config": asdict(preset("tiny"))})
    cfg = train_mod.train_preset("tiny", checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(InputError, match=r"last.pt: checkpoint was trained with fusion=on .* the model has "
                                         r"fusion=off \(variant no-fusion\)"):
        train_mod.train(synthetic_store, BENCH, "tiny", cfg, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                        resume=ckpt, switches={"fusion": False})
    with pytest.raises(InputError, match="unknown model switch"):
        train_mod.train(synthetic_store, BENCH, "tiny", cfg, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                        switches={"wings": False})
    assert not (tmp_path / "ckpt").exists()


def test_cli_ablate_rejects_bad_input_before_anything_runs(synthetic_store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["ablate", "--benchmark", BENCH, "--store", str(synthetic_store),
                                 "--variants", "full,no-wings", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert result.exit_code == 2 and "unknown ablation variant 'no-wings'" in result.output
    result = runner.invoke(app, ["ablate", "--benchmark", BENCH, "--store", str(tmp_path / "none.zarr")])
    assert result.exit_code == 2 and "none.zarr" in result.output
    assert not (tmp_path / "m.db").exists()


@pytest.mark.slow
def test_ablate_flow_two_variants_nested_runs_table_and_parameter_counts(prefect_api, synthetic_store,
                                                                         tmp_path):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from flows.ablate import ablate
    from xmask3d.engine.checkpoint import load_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_config = {"max_steps": 2, "loop": 2, "batch_size": 2, "checkpoint_every": 0,
                    "checkpoint_dir": str(tmp_path / "ckpt")}
    state = ablate(store=str(synthetic_store), benchmark=BENCH, preset="tiny",
                   variants=["full", "no-fusion+no-binary-head"], train_config=train_config,
                   tracking_uri=uri, max_views=1, panel_scenes=1, return_state=True)
    assert state.is_completed()
    result = state.result()
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"ablate-{BENCH}"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert found and found[0].type == "table"
    table = json.loads(found[0].data)
    assert [row["variant"] for row in table] == ["full", "no-fusion+no-binary-head"]
    for row in table:
        for head in ("3d", "2d", "fused"):
            for score in ("hIoU", "mIoU base", "mIoU novel"):
                value = row[f"{head} {score}"]
                assert value is None or 0.0 <= value <= 100.0
    full, ablated = table
    assert (ablated["fusion"], ablated["binary_head"], ablated["implicit_condition"]) == ("off", "off", "on")
    assert full["parameters"] > ablated["parameters"] > 0  # merger and binary UNet really removed

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "ablation"
    assert json.loads(parent.data.params["ablation.variants"]) == ["full", "no-fusion+no-binary-head"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "ablation")} == {
        "ablation/ablation.md", "ablation/ablation.csv"}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {run.info.run_name: run for run in children}
    assert set(by_name) == {"full", "no-fusion+no-binary-head"}
    for name, row in zip(("full", "no-fusion+no-binary-head"), table, strict=True):
        run = by_name[name]
        assert run.info.status == "FINISHED" and row["run_id"] == run.info.run_id
        assert run.data.params["model.fusion"] == str(name == "full")
        assert run.data.metrics["parameters/trainable"] == row["parameters"]
        assert run.data.metrics["eval/fused/hiou"] == pytest.approx(row["fused hIoU"], abs=0.051) \
            if row["fused hIoU"] is not None else "eval/fused/hiou" not in run.data.metrics
        recorded = load_checkpoint(tmp_path / "ckpt" / run.info.run_id / "last.pt")["model_config"]
        assert (recorded["fusion"], recorded["binary_head"]) == (name == "full", name == "full")
        panels = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation/panels")]
        assert any(p.endswith("_topdown.png") for p in panels) and any("_view" in p for p in panels)
    losses = {m.key for m in client.get_metric_history(by_name["full"].info.run_id, "loss/loss_binary")}
    assert losses == {"loss/loss_binary"}
    assert not client.get_metric_history(by_name["no-fusion+no-binary-head"].info.run_id, "loss/loss_binary")
    assert client.search_registered_models() == []  # variants are not registered as model versions
