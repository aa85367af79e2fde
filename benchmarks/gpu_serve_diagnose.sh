#!/usr/bin/env bash
# One device call: what limits the streams a trained model serves. On the model gpu_render_speedup.sh brought
# back (lieu, whisper, 115k Gaussians), serving load with the render queue 1 and 2 deep while recording the CPU
# cores each process uses per level (server, its event-loop thread, render process, load generator) and the GPU
# utilisation, then once more with the server's event-loop thread under cProfile.
#
#   bash benchmarks/gpu_serve_diagnose.sh                  (carry .whl .carry_diag; ~6 minutes)
#   RENDER_PROFILE=1 CPROFILE=0 PLAN="2:20,24,28 1:20,24 2:20,24,28" bash benchmarks/gpu_serve_diagnose.sh
#   CPROFILE=0 PLAN="2:24,28:auto:0 2:24,28 2:24,28:cpu" bash benchmarks/gpu_serve_diagnose.sh
#                     (render_profile_gpu.py's variants on this model, then serving runs DEPTH:LEVELS in order;
#                     HALF=1 first compares fp16 with fp32 frames and speed: half_precision_gpu.py)
# .carry_diag: model/ (the model folder, model.pt joined from its parts), lieu/ (a pack for serving alone:
# train_quality_gpu.py pack's meta/preprocess_config/transforms/au.csv/aud.npy/bc.jpg/torso.mp4/torso_alpha.npz),
# gsplat_cuda.so.xz, whisper_l3.bin.xz, speech_60s_16k.wav.
set -uo pipefail
OUT=${OUT:-/tmp/out}
WORK=$PWD/.gpu_work
CARRY=.carry_diag
LEVELS=${LEVELS:-16,20,24,28}
mkdir -p "$OUT" "$WORK" /tmp/site
rm -f "$WORK"/serve_diag_*.json  # a warm machine keeps the last call's
exec > >(tee "$OUT/serve_diagnose_log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p .torch_ext/gsplat_cuda
unxz() { python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.decompress(open(sys.argv[1], 'rb').read()))" "$1" "$2"; }
unxz "$CARRY/gsplat_cuda.so.xz" .torch_ext/gsplat_cuda/gsplat_cuda.so || exit 1
unxz "$CARRY/whisper_l3.bin.xz" /tmp/whisper_l3.bin || exit 1
export PYTHONPATH=/tmp/site:$PWD TORCH_EXTENSIONS_DIR=$PWD/.torch_ext PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nproc
DATA=$(python3 -c "import json; print(json.load(open('$CARRY/model/model.json'))['dataset'])")
python3 benchmarks/train_quality_gpu.py unpack "$CARRY/lieu" "$DATA" || exit 1
MODEL=$CARRY/model
SECONDS=0
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$WORK/gpu_util.csv" &
SMI=$!

if [ "${HALF:-0}" = 1 ]; then
  echo "== fp16 against fp32 (t=${SECONDS}s)"
  timeout 120 python3 benchmarks/half_precision_gpu.py "$MODEL" --dataset "$DATA" --json "$WORK/serve_diag_half_precision.json"
fi
if [ "${RENDER_PROFILE:-0}" = 1 ]; then
  echo "== render variants (t=${SECONDS}s)"
  timeout 120 python3 benchmarks/render_profile_gpu.py "$MODEL" --dataset "$DATA" --skip-static \
    --json "$WORK/serve_diag_render_profile.json"
fi
# PLAN: serving runs in order, each DEPTH:LEVELS[:ENCODER_DEVICE[:MERGE]] (a fresh server each; repeats show the
# run-to-run spread). ENCODER_DEVICE: serve --encoder-device (default auto: the GPU); MERGE=0 turns off merging
# the sessions' encoder calls (EGSTALKER_MERGE_ENCODER=0).
k=0
for run in ${PLAN:-1:$LEVELS 2:$LEVELS}; do
  IFS=: read -r depth levels encoder merge <<< "$run"
  encoder=${encoder:-auto} merge=${merge:-1} k=$((k + 1))
  echo "== serve $k, render queue $depth, levels $levels, encoder on $encoder, merged calls $merge (t=${SECONDS}s)"
  EGSTALKER_MERGE_ENCODER=$merge timeout 160 python3 benchmarks/serve_load.py "$MODEL" --device cuda --dataset "$DATA" \
    --audio "$CARRY/speech_60s_16k.wav" --audio-weights /tmp/whisper_l3.bin --levels "$levels" --seconds 8 \
    --stop-below 0 --render-queue "$depth" --encoder-device "$encoder" \
    --out "$WORK/serve_diag_${k}_queue${depth}_encoder_${encoder}_merge$merge.json" 2>&1 \
    | grep -v "egstalker.serve: session"
  cp "$WORK"/serve_diag_${k}_*.json "$OUT"/ 2>/dev/null  # back even if a later run hits the call's time limit
done
if [ "${CPROFILE:-1}" = 1 ]; then
  echo "== serve under cProfile, render queue 1, 24 sessions (t=${SECONDS}s)"
  timeout 120 python3 benchmarks/serve_load.py "$MODEL" --device cuda --dataset "$DATA" \
    --audio "$CARRY/speech_60s_16k.wav" --audio-weights /tmp/whisper_l3.bin --levels 24 --seconds 8 \
    --stop-below 0 --render-queue 1 --profile-server "$WORK/server.prof" --out "$WORK/serve_diag_profiled.json" 2>&1 \
    | grep -v "egstalker.serve: session"
  python3 - "$WORK/server.prof" > "$WORK/server_profile.txt" <<'PY'
import pstats, sys
stats = pstats.Stats(sys.argv[1])
stats.sort_stats("tottime").print_stats(45)
stats.sort_stats("cumulative").print_stats(45)
PY
fi
kill $SMI
(cd "$WORK" && tar czf "$OUT/serve_diagnose.tgz" serve_diag_*.json gpu_util.csv server_profile.txt server.prof 2>/dev/null)
echo "done after ${SECONDS}s"
ls -la "$OUT"
