"""The component ablation study: train and evaluate model variants, compare them in one table.

A *variant* is a set of component switches turned off (``xmask3d.network.config.SWITCHES``; names from
``variant_switches``: ``full``, ``no-fusion``, ``no-implicit-condition+no-binary-head``, ...). The
default list is the full model and each switch off alone, as the paper's ablation table. A
``region-captions`` part (``region-captions``, ``no-fusion+region-captions``) trains that variant
with region-caption supervision instead of the view captions (docs/openvocab.md).

MLflow layout: one parent run (``ablation-<preset>``, tag ``kind=ablation``) in the benchmark's
experiment; each variant is a training run nested under it (tag ``mlflow.parentRunId``, run name =
the variant), with the usual training params/metrics, its checkpoint, and the evaluation (metrics
``eval/<head>/...``, ``evaluation/`` artifacts with the qualitative panels). Variants are not
registered as model versions: an ablation does not produce a candidate. The parent gets the
comparison table as ``ablation/ablation.md`` and ``ablation/ablation.csv``.

Plain functions (no Prefect): :func:`run_ablation` runs everything in order; ``flows/ablate.py``
calls :func:`start_ablation`, :func:`run_variant` per variant and :func:`finish_ablation` as tasks.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.benchmarks import get_benchmark
from storage.errors import InputError
from storage.objects import as_path
from xmask3d.engine import tracking
from xmask3d.engine.evaluate import evaluate_loaded, log_evaluation
from xmask3d.engine.predict import load_model_for_inference
from xmask3d.engine.train import check_store, train, train_preset
from xmask3d.network.config import SWITCHES, variant_name, variant_supervision, variant_switches
from xmask3d.network.model import trainable_parameters

log = logging.getLogger(__name__)

DEFAULT_VARIANTS: tuple[str, ...] = ("full", *(variant_name({s: False}) for s in SWITCHES))
HEADS = ("3d", "2d", "fused")
SCORES = (("hiou", "hIoU"), ("miou_base", "mIoU base"), ("miou_novel", "mIoU novel"))
SWITCH_TITLES = {"implicit_condition": "implicit cond.", "mask_regularization": "mask reg.",
                 "fusion": "fusion", "binary_head": "binary head", "caption_losses": "captions"}


def resolve_variants(variants: Sequence[str] | str | None) -> list[str]:
    """Canonical variant names (comma-separated string or list; None = the default list).

    InputError on an unknown name or a repeated variant, before anything is trained."""
    if variants is None:
        return list(DEFAULT_VARIANTS)
    if isinstance(variants, str):
        variants = [v for v in variants.split(",") if v.strip()]
    names = [variant_name(variant_switches(v), variant_supervision(v)) for v in variants]
    if not names:
        raise InputError("ablation: no variants given")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"ablation: variant(s) {repeated} given more than once")
    return names


@dataclass
class VariantResult:
    """One trained and evaluated variant."""

    variant: str
    switches: dict[str, bool]
    run_id: str
    checkpoint: str
    parameters: int  # trainable parameters of the variant's model
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)  # "<head>/<metric>" (fractions)

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "switches": dict(self.switches), "run_id": self.run_id,
                "checkpoint": self.checkpoint, "parameters": self.parameters, "steps": self.steps,
                "metrics": dict(self.metrics)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariantResult:
        return cls(**{k: data[k] for k in ("variant", "switches", "run_id", "checkpoint", "parameters",
                                           "steps", "metrics")})


@dataclass
class AblationResult:
    parent_run_id: str
    variants: list[VariantResult]
    rows: list[dict[str, Any]]  # the comparison table (Prefect table artifact)
    markdown: str
    csv: str


def _percent(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(100 * value, 1)


def table_rows(results: Sequence[VariantResult]) -> list[dict[str, Any]]:
    """One row per variant: switches (on/off), trainable parameters, and hIoU / mIoU base / mIoU
    novel (%) of the 3D, 2D and fused heads; ``None`` where a score is undefined."""
    rows = []
    for result in results:
        row: dict[str, Any] = {"variant": result.variant}
        for switch in SWITCHES:
            row[switch] = "on" if result.switches.get(switch, True) else "off"
        row["parameters"] = result.parameters
        for head in HEADS:
            for key, title in SCORES:
                row[f"{head} {title}"] = _percent(result.metrics.get(f"{head}/{key}"))
        row["run_id"] = result.run_id
        rows.append(row)
    return rows


def table_markdown(rows: Sequence[Mapping[str, Any]], benchmark: str, preset: str) -> str:
    """The paper-style ablation table: ✓/✗ per component, then hIoU / mIoU B / mIoU N per head."""
    def cell(value: Any) -> str:
        return "–" if value is None else f"{value:.1f}"

    header = ["variant", *(SWITCH_TITLES[s] for s in SWITCHES), "trainable params"]
    head_titles = {"3d": "3D", "2d": "2D", "fused": "fused"}
    header += [f"{head_titles[head]} {title}" for head in HEADS for _, title in SCORES]
    lines = [f"# Ablation on {benchmark} ({preset} preset)", "",
             "Scores in %, hIoU = 2·B·N/(B+N); ✓ = component on, ✗ = off. "
             "Each variant is a nested MLflow run (run id in the CSV).", "",
             "| " + " | ".join(header) + " |",
             "|---|" + ":---:|" * len(SWITCHES) + "---:|" * (1 + len(HEADS) * len(SCORES))]
    for row in rows:
        cells = [f"`{row['variant']}`", *("✓" if row[s] == "on" else "✗" for s in SWITCHES),
                 f"{row['parameters']:,}"]
        cells += [cell(row[f"{head} {title}"]) for head in HEADS for _, title in SCORES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["variant"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Steps (each a Prefect task in flows/ablate.py)


def start_ablation(store_path: Path, benchmark: str, preset: str, variants: Sequence[str],
                   tracking_uri: str | None = None, train_overrides: Mapping[str, Any] | None = None) -> str:
    """Check the inputs and open the parent MLflow run; -> its run id."""

    bench = get_benchmark(benchmark)
    names = resolve_variants(list(variants))
    cfg = train_preset(preset, **dict(train_overrides or {}))
    check_store(as_path(store_path), bench, need_val=True)
    run = tracking.RunTracker(tracking_uri, bench.name, run_name=f"ablation-{preset}",
                              tags={"kind": "ablation", "preset": preset})
    run.log_params({"ablation": {"benchmark": bench.name, "preset": preset, "variants": names,
                                 "store": str(as_path(store_path).resolve()),
                                 "train_overrides": dict(train_overrides or {})},
                    "train": cfg.to_dict()})
    return run.run_id


def run_variant(store_path: Path, benchmark: str, preset: str, variant: str, parent_run_id: str,
                tracking_uri: str | None = None, train_overrides: Mapping[str, Any] | None = None,
                max_views: int = 0, panel_scenes: int = 1) -> VariantResult:
    """Train one variant (nested under the parent run), evaluate it on the validation scenes
    (metrics and panels into the variant's run); -> its result."""

    name = variant_name(variant_switches(variant), variant_supervision(variant))
    switches = {s: True for s in SWITCHES} | variant_switches(name)
    supervision = variant_supervision(name)
    overrides = {**dict(train_overrides or {}), "evaluate": False}  # evaluated below, not registered
    cfg = train_preset(preset, **overrides)
    log.info("ablation %s: training variant %s", benchmark, name)
    trained = train(as_path(store_path), benchmark, preset, cfg, tracking_uri=tracking_uri, switches=switches,
                    caption_supervision=supervision)
    run = tracking.RunTracker(tracking_uri, benchmark, run_id=trained.run_id)
    run.set_tags({"mlflow.parentRunId": parent_run_id, "mlflow.runName": name, "variant": name,
                  "kind": "ablation-variant"})
    try:
        loaded = load_model_for_inference(trained.checkpoint_path)
        parameters = trainable_parameters(loaded.model)
        evaluation = evaluate_loaded(loaded, as_path(store_path), benchmark, max_views=max_views,
                                     ply_scenes=0, panel_scenes=panel_scenes)
        log_evaluation(run, evaluation, step=trained.steps)
        run.log_metrics({"parameters/trainable": parameters}, step=trained.steps)
    except BaseException:
        run.end("FAILED")
        raise
    run.end()
    scores = {k: v for k, v in evaluation.metrics.items()
              if k.split("/")[0] in (*HEADS, "baseline") and "/iou/" not in k}
    return VariantResult(name, switches, trained.run_id, str(trained.checkpoint_path), parameters,
                         trained.steps, scores)


def finish_ablation(parent_run_id: str, benchmark: str, preset: str, results: Sequence[VariantResult],
                    tracking_uri: str | None = None) -> AblationResult:
    """Write the comparison table into the parent run (markdown + CSV) and end it."""

    rows = table_rows(results)
    markdown = table_markdown(rows, benchmark, preset)
    text = table_csv(rows)
    run = tracking.RunTracker(tracking_uri, benchmark, run_id=parent_run_id)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ablation.md").write_text(markdown)
        (Path(tmp) / "ablation.csv").write_text(text)
        run.log_artifacts(Path(tmp), "ablation")
    run.set_tags({"variants": ",".join(r.variant for r in results)})
    run.end()
    return AblationResult(parent_run_id, list(results), rows, markdown, text)


def end_failed(parent_run_id: str, benchmark: str, tracking_uri: str | None = None) -> None:
    """Mark the parent run FAILED (a variant raised)."""

    tracking.RunTracker(tracking_uri, benchmark, run_id=parent_run_id).end("FAILED")


def run_ablation(store_path: Path, benchmark: str, preset: str = "tiny",
                 variants: Sequence[str] | None = None, tracking_uri: str | None = None,
                 train_overrides: Mapping[str, Any] | None = None, max_views: int = 0,
                 panel_scenes: int = 1) -> AblationResult:
    """Every step in this process, variants one after another (no Prefect)."""
    names = resolve_variants(variants)
    parent = start_ablation(store_path, benchmark, preset, names, tracking_uri, train_overrides)
    results = []
    try:
        for name in names:
            results.append(run_variant(store_path, benchmark, preset, name, parent, tracking_uri,
                                       train_overrides, max_views, panel_scenes))
    except BaseException:
        end_failed(parent, benchmark, tracking_uri)
        raise
    return finish_ablation(parent, benchmark, preset, results, tracking_uri)
