#!/usr/bin/env bash
# The training step's GPU checks in one run, for a lent GPU machine (docs/benchmarks.md, "Training
# step"): `paper` batch 16 bf16 step time and peak memory with the frozen-UNet bound measured in the
# same process, the per-phase profile and operator/sync counts, the frozen-weight copies, and the
# same step with conv0 on the large-kernel implicit GEMM.
# Results (text and JSON) go to $OUT (default benchmarks/out). Install first as
# ../shared/device/README.md says; run from the repository root. The scripts import the step, the
# model and the synthetic batch only (no MLflow, Zarr, Prefect or Dask: tests/test_layers.py checks
# it), so beside the machine's image they need spconv-cu126 + cumm-cu126, diffusers, open_clip_torch
# and ftfy.
set -euo pipefail
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" benchmarks/bench_step.py --device cuda --preset paper --batch 16 --points 30000 --amp --unet-bound \
    --steps 10 --warmup 3 --json "$OUT/step_paper_b16_bf16.json" 2>&1 | tee "$OUT/step_paper_b16_bf16.txt"
"$PY" benchmarks/bench_step.py --device cuda --preset paper --batch 16 --points 30000 --amp --profile \
    --no-baseline --steps 3 --warmup 2 --json "$OUT/profile_paper_b16_bf16.json" 2>&1 | tee "$OUT/profile.txt"
"$PY" benchmarks/bench_frozen_casts.py --device cuda --preset paper --views 16 --steps 5 \
    --json "$OUT/frozen_casts_paper_16.json" 2>&1 | tee "$OUT/frozen_casts.txt"
# last, and allowed to fail (its kernels are compiled through NVRTC at first use): the same step
# with conv0 on spconv's large-kernel implicit GEMM (Backbone3DConfig.conv0_large_kernel_fast)
"$PY" benchmarks/bench_step.py --device cuda --preset paper --batch 16 --points 30000 --amp --no-baseline \
    --conv0-large-kernel-fast --steps 10 --warmup 3 --json "$OUT/step_paper_b16_bf16_conv0fast.json" 2>&1 \
    | tee "$OUT/step_paper_b16_bf16_conv0fast.txt" || echo "conv0 large-kernel variant failed (see the text above)"
