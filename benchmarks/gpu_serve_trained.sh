#!/usr/bin/env bash
# One short device call on a trained lieu model brought back from an earlier call: serving load (sessions held at
# 25 fps, latency, GPU memory) with serve's defaults (render process, precision auto = fp16 on CUDA, warm-up of
# every batch size before listening), then the lip-sync control (benchmarks/lipsync_control.py).
#
#   [SERVE=0] [LIPSYNC=0] bash benchmarks/gpu_serve_trained.sh NAME [LEVELS]         carry: .whl .carry3
# .carry3 (git-ignored): lieu + lieu_mel packs (train_quality_gpu.py pack), gsplat_cuda.so.xz, speech_60s_16k.wav
# and NAME_model.tar.xz.part-* (the model folder without checkpoints, xz, split: see docs/gpu.md).
set -uo pipefail
NAME=${1:?model name} LEVELS=${2:-16,20,24,16}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site /tmp/egs_torch_ext/gsplat_cuda
exec > >(tee "$OUT/serve_trained_log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -c "import lzma; open('/tmp/egs_torch_ext/gsplat_cuda/gsplat_cuda.so', 'wb').write(lzma.decompress(open('.carry3/gsplat_cuda.so.xz', 'rb').read()))" || exit 1
export PYTHONPATH=/tmp/site:$PWD TORCH_EXTENSIONS_DIR=/tmp/egs_torch_ext PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
MODEL=/tmp/egs_models/$NAME
rm -rf "$MODEL" && mkdir -p "$MODEL"
cat .carry3/"$NAME"_model.tar.xz.part-* | xz -dc | tar x -C "$MODEL" --strip-components=1 || exit 1
python3 - <<'PY' || exit 1
import shutil, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from train_quality_gpu import unpack
target = Path("/tmp/egs_ds/lieu")
shutil.rmtree(target, ignore_errors=True)
unpack(Path(".carry3/lieu"), target)
for f in ("aud.npy", "meta.json"):
    shutil.copy2(Path(".carry3/lieu_mel") / f, target / f)
PY
if [ "${SERVE:-1}" != 0 ]; then
  python3 benchmarks/serve_load.py "$MODEL" --device cuda --dataset /tmp/egs_ds/lieu --audio .carry3/speech_60s_16k.wav \
    --levels "$LEVELS" --seconds 8 --stop-below 0 --out "$OUT/serve_load_trained_$NAME.json" 2>&1 \
    | grep -v "egstalker.serve: session"
fi
if [ "${LIPSYNC:-1}" != 0 ]; then
  python3 benchmarks/lipsync_control.py "$MODEL" --dataset /tmp/egs_ds/lieu --device cuda \
    --save-renders "$OUT/lipsync_renders_$NAME.npz"  # scored here: --from-renders (MediaPipe)
fi
