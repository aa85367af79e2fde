#!/usr/bin/env bash
# One device call that measures everything the GPU issues ask for, on one freshly trained model:
#   1. gsplat's one-time CUDA build (timed; skipped when .torch_ext holds a prebuilt gsplat_cuda.so),
#   2. training on the packed lieu dataset under a time budget + held-out scores (train_quality_gpu.py),
#   3. render speed at 512x512 of that model: model-only, API, end to end to mp4 (render_speed.py),
#   4. real-time serving: concurrent sessions held at 25 fps, latency, GPU memory (serve_load.py),
#   and the built gsplat_cuda.so back through $OUT right after step 1 (gzip, split under the 16 MiB limit).
#
# Prepared here (git-ignored folders, all carried):
#   .whl/gsplat-1.5.3-py3-none-any.whl         pip download --no-deps gsplat==1.5.3 -d .whl
#   .carry/lieu, .carry/vgg16_int8.pkl          train_quality_gpu.py pack DATASET lieu; ... pack-weights
#   .render_bench/{av.tar.xz,oww/,speech_60s_16k.wav}   render_speed.py --make-carry; cp ../shared/.../speech_60s_16k.wav
# Run through the device tool from the repo root:
#   bash benchmarks/gpu_session.sh MINUTES      (carry: .whl .carry .render_bench [.torch_ext])
set -uo pipefail
MINUTES=${1:-3}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site
exec > >(tee "$OUT/gpu_session_log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
tar xJf .render_bench/av.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/.render_bench/oww
export TORCH_EXTENSIONS_DIR=$PWD/.torch_ext TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"

echo "== 1. gsplat build"
SECONDS=0
python3 benchmarks/gsplat_warmup.py
echo "gsplat ready after ${SECONDS} s"
SO=.torch_ext/gsplat_cuda/gsplat_cuda.so  # back through $OUT at once, so a later cut cannot lose it
[ -f "$SO" ] && sha256sum "$SO" && gzip -1 -c "$SO" | split -b 15M - "$OUT/gsplat_cuda.so.gz.part-"

echo "== 2. train lieu (${MINUTES} min budget)"
mkdir -p "$OUT/train"
python3 benchmarks/train_quality_gpu.py device --clip lieu --minutes "$MINUTES" --work /tmp/egs_work --carry .carry \
  ${PERCEPTUAL:+--set loss.perceptual=$PERCEPTUAL}
cp /tmp/egs_work/lieu/summary.json /tmp/egs_work/lieu/renders_*.npz "$OUT/train/"

MODEL=/tmp/egs_work/lieu/model
DATA=/tmp/egs_ds/lieu
echo "== 3. render speed at 512x512"
python3 benchmarks/render_speed.py "$MODEL" --device cuda --size 512 --dataset "$DATA" \
  --audio .render_bench/speech_60s_16k.wav --batch-sizes 1 8 32 --frames 512 --e2e-seconds 60 \
  --json "$OUT/render_gpu.json"

echo "== 4. serve load"
python3 benchmarks/serve_load.py "$MODEL" --device cuda --dataset "$DATA" --audio .render_bench/speech_60s_16k.wav \
  --levels 1,8,16,24,32,48 --seconds 8 --out "$OUT/serve_load_gpu.json"

ls -la "$OUT" "$OUT/train"
