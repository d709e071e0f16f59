#!/usr/bin/env bash
# Issue #4, one GPU call (~5 min): correctness and speed of flash_attn.py's backward variants
# (FLASH_BWD=split|tma|tma_t|atomic, see flash_attn.py "variants") against SDPA flash and cuDNN.
#
#   bash notes/kernel_bench.sh            # from the repo root; logs under $OUT (default ./kernel_bench_out)
#
# 1) in parallel (the GPU machine has 16+ cores; Triton compiles one kernel per process at a time):
#    the GPU bf16 correctness tests of each variant (fixed default tiles) and, per variant and
#    head-dim/causal combination, a compile + autotune warm-up that fills Triton's cache;
# 2) notes/kernel_bench.py: every variant, SDPA flash and cuDNN at the key shapes, in one process
#    (its autotuning then finds every kernel compiled), table at the end of bench.log.
set -u
OUT=${OUT:-kernel_bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
VARIANTS=${VARIANTS:-split tma tma_t atomic}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log --oneline -1; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

pids=()
for v in $VARIANTS; do
  FLASH_ATTN_AUTOTUNE=0 FLASH_BWD=$v timeout 280 $PY -m pytest tests/test_flash_attn.py -q -rf \
    -k "(gpu_matches_reference and bf16) or model_trains" > "$OUT/test_$v.log" 2>&1 &
  pids+=($!)
  for s in 128:8192:1 64:8192:1 128:8192:0; do  # 128:2048:1 shares 128:8192:1's compiled kernels
    timeout 280 $PY notes/kernel_bench.py --variants "$v" --shapes "$s" --warmup-only \
      > "$OUT/warmup_${v}_${s//:/_}.log" 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p"; done
echo "== phase 1 (tests + compile warm-up) took $(( $(date +%s) - T0 )) s"
for v in $VARIANTS; do
  echo "== GPU tests, FLASH_BWD=$v: $(tail -n 1 "$OUT/test_$v.log")"
  grep -E "^FAILED|Error" "$OUT/test_$v.log" | head -5
done
grep -l -E "FAILED|Traceback" "$OUT"/warmup_*.log 2>/dev/null | sed 's/^/== warm-up problem: /'

timeout 330 $PY notes/kernel_bench.py --variants "$(echo $VARIANTS | tr ' ' ',')" 2>&1 | tee "$OUT/bench.log"
echo "== total $(( $(date +%s) - T0 )) s"
