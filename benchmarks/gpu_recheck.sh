#!/usr/bin/env bash
# The GPU peak and speed of training with the per-Gaussian network recomputed in chunks (the default of 12-04) against
# in one piece, and the default training recipe re-measured on the code of 2026-12-05 (H200, 2026-12-05).
#
#   bash benchmarks/gpu_recheck.sh memory   carry .whl .carry_v7 (lieu + obama packs of that day's preprocess,
#                                           int8 VGG16, gsplat .so.xz; train_quality_gpu.py pack): train_memory_gpu.py,
#                                           the network recomputed in one piece vs in chunks, twice each at obama's
#                                           450 px and once each at lieu's 256 px, alone on the GPU (~4 minutes).
#                                           Run on 12-05 while chunks were the default, under the variant names of
#                                           then: `whole_recompute` (one piece) and `default` (chunks)
#   bash benchmarks/gpu_recheck.sh memory512
#                                           carry .whl .carry_mem (the 512 px phone_framed pack of 12-04, int8 VGG16,
#                                           gsplat .so.xz): the same two cases at 512 px, twice each, interleaved
#                                           (~4 minutes). Written on 2026-12-05 and not run yet: the device
#                                           refused every start after the `train` call that day
#   bash benchmarks/gpu_recheck.sh train    carry .whl .carry_v7: sweep $SWEEP (default `recheck`: lieu seed 7,
#                                           obama seed 2; `lossless`: seeds 8 and 3), budgets of $MINUTES (5) sharing
#                                           the GPU, then gpu_sweep.sh finish with the lip-sync control renders, all
#                                           in one call (~9 minutes). The first try ran it as two calls after
#                                           `memory`; the machine went back in the 30 idle seconds between them and
#                                           the runs were lost. LPIPS is scored here (alexnet.ckpt does not fit
#                                           beside both packs): `recheck` from JPEG q97 renders, runs since from
#                                           lossless PNG ones.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site
if [ "${1:-}" = "memory" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/recheck_memory_log.txt"
  for pass in obama:450 lieu:256; do
    clip=${pass%%:*} px=${pass##*:}
    cases=("$px:150000:default" "$px:150000:chunked")
    [ "$clip" = obama ] && cases+=("${cases[@]}")  # twice, interleaved: one case's speed varies between calls
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/train_memory_gpu.py --carry .carry_v7 --clip "$clip" \
      --cases "${cases[@]}" --iterations 200 --workers 6 --out "$OUT/train_memory_chunked_$clip.json" \
      2>&1 | tee -a "$OUT/recheck_memory_log.txt"
  done
elif [ "${1:-}" = "memory512" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/recheck_memory512_log.txt"
  PYTHONPATH=/tmp/site:$PWD python3 benchmarks/train_memory_gpu.py --carry .carry_mem --clip phone_framed \
    --cases 512:150000:default 512:150000:chunked 512:150000:default 512:150000:chunked --iterations 200 \
    --workers 6 --out "$OUT/train_memory_chunked_512.json" 2>&1 | tee -a "$OUT/recheck_memory512_log.txt"
elif [ "${1:-}" = "train" ]; then
  # MINUTES (5): each run's training budget; shorter when little device time is left
  CARRY=.carry_v7 SWEEP=${SWEEP:-recheck} ITERATIONS=6000 WORKERS=6 CALL_S=450 bash benchmarks/gpu_sweep.sh start "${MINUTES:-5}"
  WAIT_S=60 CONTROLS=1 bash benchmarks/gpu_sweep.sh finish
else
  echo "usage: gpu_recheck.sh memory | memory512 | train" >&2
  exit 2
fi
