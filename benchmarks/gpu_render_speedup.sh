#!/usr/bin/env bash
# One device call on a freshly trained default lieu model (whisper features; VGG term off: the int8 VGG16 does
# not fit in the same 64 MiB carry as the whisper encoder blocks that serving needs):
#   1. train alone on the GPU (seed SEED, MINUTES of loop), its lip-sync control renders;
#   2. where a batch's device time goes and what three speed-ups would give (render_profile_gpu.py);
#   3. serving load with the render queue 2 deep (the default) and 1 deep (as before it existed);
# the model folder comes back through $OUT (model.pt split in 15 MB parts).
#
#   bash benchmarks/gpu_render_speedup.sh SEED MINUTES          (carry .whl .carry_srv; ~8.5 minutes)
# .carry_srv: train_quality_gpu.py pack of lieu, gsplat_cuda.so.xz, whisper_l3.bin.xz (audio.whisper.
# write_encoder_weights), speech_60s_16k.wav.
set -uo pipefail
SEED=${1:-4} MINUTES=${2:-3.3}
OUT=${OUT:-/tmp/out}
WORK=$PWD/.gpu_work
CARRY=.carry_srv
RUN=lieu_whisper_seed$SEED
mkdir -p "$OUT" "$WORK" /tmp/site
exec > >(tee "$OUT/render_speedup_log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p .torch_ext/gsplat_cuda
python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.decompress(open(sys.argv[1], 'rb').read()))" \
  "$CARRY/gsplat_cuda.so.xz" .torch_ext/gsplat_cuda/gsplat_cuda.so || exit 1
python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.decompress(open(sys.argv[1], 'rb').read()))" \
  "$CARRY/whisper_l3.bin.xz" /tmp/whisper_l3.bin || exit 1
export PYTHONPATH=/tmp/site:$PWD TORCH_EXTENSIONS_DIR=$PWD/.torch_ext PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
SECONDS=0

echo "== train $RUN ($MINUTES min loop)"
python3 benchmarks/train_quality_gpu.py device --clip lieu --name "$RUN" --set "seed=$SEED" --set loss.perceptual=0 \
  --minutes "$MINUTES" --iterations 12000 --workers 3 --carry "$CARRY" --work "$WORK" 2>&1 \
  | tr '\r' '\n' | awk 'NR % 40 == 0 || /^\{/'
MODEL=$WORK/$RUN/model DATA=/tmp/egs_ds/$RUN
[ -f "$MODEL/model.pt" ] || { echo "no trained model"; exit 1; }
echo "trained after $SECONDS s"
(cd "$WORK/$RUN/model" && split -b 15M model.pt "$OUT/model.pt.part-")
python3 benchmarks/lipsync_control.py "$MODEL" --dataset "$DATA" --device cuda --save-renders "$OUT/controls_$RUN.npz"
echo "controls after $SECONDS s"

pack() {  # everything small in one file (at most 8 files come back)
  (cd "$WORK" && tar czf "$OUT/results.tgz" --exclude checkpoints --exclude logs --exclude model.pt \
     "$RUN/summary.json" "$RUN"/renders_*.npz "$RUN/model" ./*.json ./*.txt 2>/dev/null)
}
echo "== where the device time goes"
timeout 150 python3 benchmarks/render_profile_gpu.py "$MODEL" --dataset "$DATA" \
  --json "$WORK/render_profile.json" --trace "$WORK/render_profile_trace.txt"
echo "profiled after $SECONDS s"
pack

for depth in 2 1; do
  levels=20,24,28,32
  [ $depth = 1 ] && levels=20,24
  echo "== serve, render queue $depth"
  timeout 150 python3 benchmarks/serve_load.py "$MODEL" --device cuda --dataset "$DATA" \
    --audio "$CARRY/speech_60s_16k.wav" --audio-weights /tmp/whisper_l3.bin --levels "$levels" --seconds 8 \
    --stop-below 0 --render-queue $depth --out "$WORK/serve_load_queue$depth.json" 2>&1 \
    | grep -v "egstalker.serve: session"
  echo "served after $SECONDS s"
  pack
done
ls -la "$OUT"
