#!/usr/bin/env bash
# Two device calls (2026-12-05): the GPU peak and speed of training with the per-Gaussian network recomputed in
# chunks (the default) against in one piece, then the default training recipe re-measured on today's code.
#
#   bash benchmarks/gpu_recheck.sh start     call 1, carry .whl .carry_v7 (lieu + obama packs of today's
#                                            preprocess, int8 VGG16, gsplat .so.xz; train_quality_gpu.py pack):
#                                            train_memory_gpu.py, chunked (default) vs whole, twice each at obama's
#                                            450 px and once each at lieu's 256 px, alone on the GPU; then sweep
#                                            `recheck` (lieu seed 7, obama seed 2, 5-minute budgets) launched
#   bash benchmarks/gpu_recheck.sh finish    call 2 within 30 s, carry .whl .carry2: gpu_sweep.sh finish with the
#                                            lip-sync control renders (scored here: lipsync_control.py --from-renders)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site
if [ "${1:-}" = "start" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/recheck_memory_log.txt"
  for pass in obama:450 lieu:256; do
    clip=${pass%%:*} px=${pass##*:}
    cases=("$px:150000:whole_recompute" "$px:150000:default")
    [ "$clip" = obama ] && cases+=("${cases[@]}")  # twice, interleaved: one case's speed varies between calls
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/train_memory_gpu.py --carry .carry_v7 --clip "$clip" \
      --cases "${cases[@]}" --iterations 200 --workers 6 --out "$OUT/train_memory_chunked_$clip.json" \
      2>&1 | tee -a "$OUT/recheck_memory_log.txt"
  done
  CARRY=.carry_v7 SWEEP=recheck ITERATIONS=6000 WORKERS=6 CALL_S=$((585 - SECONDS)) bash benchmarks/gpu_sweep.sh start 5
elif [ "${1:-}" = "finish" ]; then
  WAIT_S=${WAIT_S:-480} CONTROLS=1 bash benchmarks/gpu_sweep.sh finish
else
  echo "usage: gpu_recheck.sh start | finish" >&2
  exit 2
fi
