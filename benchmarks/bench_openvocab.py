"""Open-vocabulary check: novel-class mIoU of the tiny model with no captions, the official view
captions, and region captions.

Same run, same synthetic scenes (16: 12 train, 4 held out), same seeds: the model trained in each
condition, the majority-class baseline and the nearest-class-name baseline, all scored on the
held-out scenes (xmask3d.engine.openvocab), with boundary IoU. Prints the table (mean [min, max] over
seeds) and the per-seed novel-mIoU gains over no captions; everything is logged to MLflow.

    .venv/bin/python benchmarks/bench_openvocab.py --out openvocab_output --seeds 0 1 2
    .venv/bin/python benchmarks/bench_openvocab.py --out /tmp/ov --epochs 1 --loop 1 --seeds 0  # smoke
    .venv/bin/python benchmarks/bench_openvocab.py --out /tmp/ov --combine  # runs of parallel processes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: no OpenMP busy-waiting

from xmask3d.engine.openvocab import (  # noqa: E402
    CONDITIONS,
    OpenVocabConfig,
    OpenVocabResult,
    RunRecord,
    report,
    run_openvocab,
)


def combine(out: Path) -> str:
    """One report over the runs of several invocations (e.g. seeds run in parallel processes)."""
    runs, baselines, config = [], {}, None
    for path in sorted(out.glob("result-*.json")):
        record = json.loads(path.read_text())
        runs += [RunRecord(**r) for r in record["runs"]]
        baselines = record["baselines"]
        config = record["config"]
    if config is None:
        raise SystemExit(f"{out}: no result-*.json")
    seeds = tuple(sorted({r.seed for r in runs}))
    conditions = tuple(c for c in CONDITIONS if any(r.condition == c for r in runs))
    runs.sort(key=lambda r: (r.seed, conditions.index(r.condition)))
    cfg = OpenVocabConfig(**{**config, "seeds": seeds, "conditions": conditions})
    return report(OpenVocabResult(cfg, runs, baselines, tracking_uri=""))


def parse_overrides(items: list[str]) -> dict[str, object]:
    """FIELD=VALUE pairs; values are read as JSON when they parse (numbers, true/false), else strings."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--loss {item!r}: expected FIELD=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("openvocab_output"))
    parser.add_argument("--tracking-uri", default=None, help="default sqlite:///OUT/mlruns.db")
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--loop", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--eval-max-views", type=int, default=0)
    parser.add_argument("--augment", action="store_true", help="voxeliser rotation/scale augmentation")
    parser.add_argument("--loss", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="LossConfig overrides, e.g. region_pooling=mean region_3d_weight=2")
    parser.add_argument("--combine", action="store_true",
                        help="print one table from every OUT/result-*.json (runs made in parallel)")
    args = parser.parse_args()
    if args.combine:
        print(combine(args.out))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    cfg = OpenVocabConfig(scenes=args.scenes, data_seed=args.data_seed, seeds=tuple(args.seeds),
                          conditions=tuple(args.conditions), epochs=args.epochs, loop=args.loop,
                          batch_size=args.batch_size, max_steps=args.max_steps,
                          eval_max_views=args.eval_max_views, loss_overrides=parse_overrides(args.loss),
                          augment=args.augment)
    start = time.monotonic()
    result = run_openvocab(args.out, cfg, args.tracking_uri)
    text = report(result)
    print(text)
    print(f"total {time.monotonic() - start:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                                  result.seconds.items()) + ")")
    record = {"config": asdict(cfg), "runs": [asdict(r) for r in result.runs], "baselines": result.baselines,
              "summary_run_id": result.summary_run_id, "tracking_uri": result.tracking_uri}
    name = "result-" + "-".join(str(s) for s in cfg.seeds)
    if set(cfg.conditions) != set(CONDITIONS):
        name += "-" + "-".join(cfg.conditions)
    name += ".json"
    (args.out / name).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
