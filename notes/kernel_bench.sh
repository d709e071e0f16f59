#!/usr/bin/env bash
# Issue #4, one GPU call (~5 min): correctness and speed of flash_attn.py's variants
# (FLASH_FWD=base|split2, FLASH_BWD=split|tma|tma_t|atomic, see flash_attn.py "variants")
# against SDPA flash and cuDNN.
#
#   bash notes/kernel_bench.sh            # from the repo root; logs under $OUT (default ./kernel_bench_out)
#
# 1) in parallel (Triton compiles one kernel at a time per process; the machine has 16+ cores):
#    the GPU bf16 correctness tests of each variant (fixed default tiles, FLASH_ATTN_AUTOTUNE=0)
#    and, per variant and head-dim/causal combination, a compile + autotune warm-up that fills
#    Triton's on-disk cache;
# 2) notes/kernel_bench.py: every variant, SDPA flash and cuDNN at the key shapes in one process
#    (its autotuning then finds every kernel compiled); the table is at the end of bench.log.
set -u
OUT=${OUT:-kernel_bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
FWDS=${FWDS:-base split2}
BWDS=${BWDS:-split tma tma_t atomic}
SHAPES3=${SHAPES3:-128:8192:1 64:8192:1 128:8192:0}  # 128:2048:1 uses 128:8192:1's compiled kernels
KB_ARGS=${KB_ARGS:-}  # extra notes/kernel_bench.py arguments (CPU dry run: --tokens 256 --dim 64 --shapes ...)
export PYTHONUNBUFFERED=1
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log --oneline -1; nproc; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
$PY -c "import pytest" 2>/dev/null || echo "== pytest missing (pip install -r requirements-test.txt): no GPU tests"
first_fwd=${FWDS%% *}
first_bwd=${BWDS%% *}

pids=()
run_test() {  # $1 forward variant, $2 backward variant
  FLASH_ATTN_AUTOTUNE=0 FLASH_FWD=$1 FLASH_BWD=$2 timeout 280 $PY -m pytest tests/test_flash_attn.py -q -rf \
    -k "(gpu_matches_reference and bf16) or model_trains" > "$OUT/test_$1+$2.log" 2>&1 &
  pids+=($!)
}
for b in $BWDS; do
  run_test "$first_fwd" "$b"
  for s in $SHAPES3; do
    timeout 280 $PY notes/kernel_bench.py --fwd "$first_fwd" --variants "$b" --shapes "$s" --warmup-only $KB_ARGS \
      > "$OUT/warmup_${first_fwd}+${b}_${s//:/_}.log" 2>&1 &
    pids+=($!)
  done
done
for f in $FWDS; do
  [ "$f" = "$first_fwd" ] && continue
  run_test "$f" "$first_bwd"
  for s in $SHAPES3; do
    timeout 280 $PY notes/kernel_bench.py --fwd "$f" --variants "$first_bwd" --shapes "$s" --warmup-only --fwd-only $KB_ARGS \
      > "$OUT/warmup_${f}_${s//:/_}.log" 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p"; done
echo "== phase 1 (tests + compile warm-up) took $(( $(date +%s) - T0 )) s"
for f in "$OUT"/test_*.log; do
  echo "== $(basename "$f" .log): $(tail -n 1 "$f")"
  grep -E "^FAILED|^E .*Error" "$f" | head -5
done
grep -l -E "FAILED|Traceback" "$OUT"/warmup_*.log 2>/dev/null | sed 's/^/== warm-up problem, see /'

timeout 300 $PY notes/kernel_bench.py --fwd "$(echo $FWDS | tr ' ' ',')" --variants "$(echo $BWDS | tr ' ' ',')" \
  $KB_ARGS 2>&1 | tee "$OUT/bench.log"
echo "== total $(( $(date +%s) - T0 )) s"
