#!/usr/bin/env bash
# The GPU run: one command for the device tool (see docs/benchmarks.md, "GPU run: how to run it").
#
#   bash benchmarks/gpu_run.sh            # on the device machine: benchmarks, then training
#
# Needs .gpu/ (made here by `python scripts/pack_gpu_inputs.py`, carried with the call).
# Installs the carried wheels into /tmp/site, runs benchmarks/gpu_bench.py (at most
# BENCH_S seconds, results in $OUT/gpu.json as it goes), then scripts/train_gpu.py until
# TOTAL_S seconds after the start (TRAIN_S at most), checkpoints and log.jsonl in $OUT.
# Environment: OUT (default out/gpu), GPU_DIR (.gpu), NO_INSTALL=1 (use what is installed), TOTAL_S (560), BENCH_S (200; 0 = no benchmarks),
# TRAIN_S (480; 0 = no training), PYTHON (python3), TINY=1 (CPU dry run sizes),
# TRAIN_ARGS / BENCH_ARGS (extra arguments).
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
GPU_DIR=${GPU_DIR:-.gpu}
TOTAL_S=${TOTAL_S:-560}
BENCH_S=${BENCH_S:-200}
TRAIN_S=${TRAIN_S:-480}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
log() { echo "[gpu_run $(( $(date +%s) - START ))s] $*"; }

if [ -d "$GPU_DIR/whl" ] && [ -z "${NO_INSTALL:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$GPU_DIR"/whl/*.whl \
    || { log "wheel install failed"; exit 1; }
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
log "python $("$PY" -c 'import sys, torch, numpy; print(sys.version.split()[0], "torch", torch.__version__, "numpy", numpy.__version__, "cuda", torch.cuda.is_available())')"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader 2>/dev/null | sed 's/^/[gpu_run] /'

TINY_BENCH=(); TINY_TRAIN=()
if [ -n "${TINY:-}" ]; then TINY_BENCH=(--tiny); TINY_TRAIN=(--tiny --batch-size 4 --ckpt-every 5 --log-every 3); fi

if [ "$BENCH_S" -gt 0 ]; then
  log "benchmarks (at most ${BENCH_S}s)"
  # sections start only within 85% of the budget; `timeout` ends a section that hangs
  timeout -k 5 "$BENCH_S" "$PY" benchmarks/gpu_bench.py --out "$OUT/gpu.json" --sources "$GPU_DIR/bench_sources.npz" \
    --budget "$(( BENCH_S * 85 / 100 ))" "${TINY_BENCH[@]}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  log "benchmarks exit ${PIPESTATUS[0]}"
fi

if [ "$TRAIN_S" -gt 0 ]; then
  DEADLINE=$(( START + TOTAL_S ))
  log "training (at most ${TRAIN_S}s, all done by +${TOTAL_S}s)"
  "$PY" scripts/train_gpu.py --data "$GPU_DIR/train_data.npz" --out "$OUT" --seconds "$TRAIN_S" \
    --deadline "$DEADLINE" "${TINY_TRAIN[@]}" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train.log"
  log "training exit ${PIPESTATUS[0]}"
fi
ls -la "$OUT"
log "done"
