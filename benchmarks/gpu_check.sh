#!/usr/bin/env bash
# One prepared GPU check (issue 18): every CUDA figure of BENCHMARKS.md in one call of at most 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # OUT_DIR default: $OUT, else ./gpu-check
#
# On a CUDA machine it runs, each step under its own timeout (the sum stays under 480 s):
#   1. the CUDA tests (test files that skip without a CUDA device);
#   2. extraction throughput vs bare forward, batch 256 bf16: resnet50-trunc and uni (ViT-L/16), random weights;
#   3. benchmarks/bench_e2e.py --cuda --parts 2: patches per step at fixed memory (resnet18-trunc at 112 px, then
#      resnet50-trunc at 224 px bf16 with and without checkpointing, frozen BatchNorm chunked), and the paper's fixed
#      inference benchmark (10,000 patches of 224 px, resnet18-trunc + ABMILX, seconds per slide);
#   4. benchmarks/bench_gma.py --cuda: GMA chunked-mode memory vs K on the GPU;
# and writes OUT_DIR/gpu-figures.md, one Markdown block for BENCHMARKS.md (machine, date, every step's table).
# Goals on an H200: extraction >= 0.8 of bare forward; 10,000-patch inference <= 0.3 s per slide;
# >= 69 ResNet-50 patches per GB at AMP (3x the paper's 23).
# Without CUDA it prints what it would run and exits 0.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${1:-${OUT:-gpu-check}}

STEPS=(
  "120|CUDA tests|$PY -m pytest -q -x -p no:cacheprovider \$(grep -l 'cuda.is_available()' -r tests --include='test_*.py' | sort)"
  "130|extraction vs bare forward, batch 256 bf16|$PY benchmarks/bench_extract.py --device cuda --encoders resnet50-trunc uni --batch-size 256 --precision bf16 --workers 8 --repeats 1"
  "150|E2E memory at AMP + fixed 10,000-patch inference|$PY benchmarks/bench_e2e.py --cuda --parts 2"
  "70|GMA chunked memory vs K|$PY benchmarks/bench_gma.py --cuda"
)

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here; on a CUDA machine this would run (seconds allowed | step | command):"
  for s in "${STEPS[@]}"; do
    IFS='|' read -r secs what cmd <<<"$s"
    echo "  ${secs}s | ${what} | ${cmd}"
  done
  echo "and write ${OUT_DIR}/gpu-figures.md"
  exit 0
fi

mkdir -p "$OUT_DIR"
MD="$OUT_DIR/gpu-figures.md"
{
  echo "### GPU check ($(date -u +%Y-%m-%d), benchmarks/gpu_check.sh)"
  echo
  echo "Machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1), $(nproc) cores," \
       "$("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"
} >"$MD"
status=0
for s in "${STEPS[@]}"; do
  IFS='|' read -r secs what cmd <<<"$s"
  echo "== ${what} (at most ${secs} s)"
  start=$(date +%s)
  timeout --kill-after=5 "$secs" bash -c "$cmd" >"$OUT_DIR/step.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  tail -40 "$OUT_DIR/step.log"
  cp "$OUT_DIR/step.log" "$OUT_DIR/$(echo "$what" | tr -c 'A-Za-z0-9' '_' | cut -c1-40).log"
  { echo; echo "#### ${what} (${took} s, exit ${rc}$([ $rc = 124 ] && echo ', timed out'))"; echo;
    echo '```'; grep -v -e '^USDT' -e 'CPUAllocator' "$OUT_DIR/step.log" | tail -60; echo '```'; } >>"$MD"
  [ $rc = 0 ] || status=1
done
rm -f "$OUT_DIR/step.log"
echo "figures: $MD"
exit $status
