#!/usr/bin/env bash
# One device call: train one clip alone on the GPU with the default config, score it, compare fp16 and fp32
# inference, and measure serving load with both, on that freshly trained model.
#
#   bash benchmarks/gpu_train_serve.sh CLIP FEATURES MINUTES     e.g. lieu lieu_mel 5.5
#
# Carried (git-ignored): .whl (gsplat wheel), .carry (CLIP and FEATURES packs from train_quality_gpu.py pack,
# vgg16_int8.pkl and gsplat_cuda.so.xz from pack-weights), .carry2 (alexnet.ckpt for LPIPS, speech_60s_16k.wav).
set -uo pipefail
CLIP=${1:?clip} FEATURES=${2:?features folder} MINUTES=${3:-5.5}
OUT=${OUT:-/tmp/out}
WORK=$PWD/.gpu_work
RUN=${CLIP}_default
mkdir -p "$OUT" "$WORK" /tmp/site
exec > >(tee "$OUT/train_serve_log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/egs_torch_ext/gsplat_cuda /tmp/egs_lpips
python3 -c "import lzma; open('/tmp/egs_torch_ext/gsplat_cuda/gsplat_cuda.so', 'wb').write(lzma.decompress(open('.carry/gsplat_cuda.so.xz', 'rb').read()))" || exit 1
cp .carry2/alexnet.ckpt /tmp/egs_lpips/
export PYTHONPATH=/tmp/site:$PWD TORCH_EXTENSIONS_DIR=/tmp/egs_torch_ext PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"

echo "== train $RUN ($MINUTES min budget)"
python3 benchmarks/train_quality_gpu.py device --clip "$CLIP" --name "$RUN" --features "$FEATURES" \
  --minutes "$MINUTES" --iterations 20000 --workers 8 --work "$WORK" 2>&1 | tr '\r' '\n' | awk 'NR % 40 == 0 || /^\{/'
EGSTALKER_LPIPS_WEIGHTS=/tmp/egs_lpips python3 benchmarks/train_quality_gpu.py lpips --work "$WORK"
mkdir -p "$OUT/$RUN" && cp "$WORK/$RUN/summary.json" "$WORK/$RUN"/renders_*.npz "$OUT/$RUN/"

echo "== fp16 vs fp32 inference"
python3 benchmarks/half_precision_gpu.py "$WORK/$RUN/model" --dataset "/tmp/egs_ds/$RUN" --json "$OUT/half_precision_gpu.json"

for precision in fp16 fp32; do
  echo "== serve ($precision)"
  python3 benchmarks/serve_load.py "$WORK/$RUN/model" --device cuda --dataset "/tmp/egs_ds/$RUN" \
    --audio .carry2/speech_60s_16k.wav --levels "${LEVELS:-8,16,24,32}" --seconds 8 --precision "$precision" \
    --out "$OUT/serve_load_$precision.json" 2>&1 | grep -v "egstalker.serve: session"
done
ls -la "$OUT"
