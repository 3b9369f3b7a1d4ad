#!/usr/bin/env bash
# sftfuse on one CUDA GPU (sized for an H100: at most about 8 minutes). Never run by tests or CI.
#   1. sftfuse verify: every Triton kernel at real shapes, bf16 and fp32, against fp64 references
#   2. each op forward + backward against eager PyTorch, Liger and bitsandbytes + PEFT, same inputs, same run,
#      with the cost model's predicted H100 time beside the measured one
#   3. one SFT step (tokens/s, peak memory) of a SmolLM2-135M-shaped and a ~1B Llama-shaped model built from config
#   4. the cost model's table, for comparison
# Tables go to bench/results/gpu_*.md. Usage: bash bench/gpu.sh  (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=bench/results
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "gpu.sh: no CUDA GPU"; exit 2; }
# Liger is a baseline only: installed without its dependencies (never touching torch), skipped if that fails.
"$PY" -c "import liger_kernel" 2>/dev/null || timeout 45 "$PY" -m pip install -q --no-deps liger-kernel \
  || echo "gpu.sh: liger-kernel not installed; its rows are left out"
status=0
{ echo '# sftfuse verify on the GPU'; echo; echo '```'
  timeout 90 "$PY" -m sftfuse.train.cli verify; echo "exit status $?"; echo '```'; } > "$OUT/gpu_verify.md" 2>&1
grep -q "exit status 0" "$OUT/gpu_verify.md" || status=1
timeout 150 "$PY" bench/gpu_bench.py ops --out "$OUT/gpu_ops.md" || status=1
timeout 180 "$PY" bench/gpu_bench.py step --out "$OUT/gpu_step.md" || status=1
{ echo '# Cost model (predicted H100), for comparison'; echo; timeout 20 "$PY" -m sftfuse.kernels.roofline; } \
  > "$OUT/gpu_roofline.md" 2>&1
cat "$OUT/gpu_verify.md"
exit $status
