#!/usr/bin/env bash
# One short device call: serving load with rendering in the server process vs in a render process of its own
# (egstalker.serve.render_process), on one model made on the spot (the initialised lieu head: no training).
#
#   bash benchmarks/gpu_serve_process.sh [LEVELS]       carry: .whl .carry3
# .carry3 (git-ignored): lieu + lieu_mel packs (train_quality_gpu.py pack), gsplat_cuda.so.xz, speech_60s_16k.wav.
set -uo pipefail
OUT=${OUT:-/tmp/out}
WORK=$PWD/.gpu_work
LEVELS=${1:-12,16,24}
mkdir -p "$OUT" "$WORK" /tmp/site
exec > >(tee "$OUT/serve_process_log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/egs_torch_ext/gsplat_cuda
python3 -c "import lzma; open('/tmp/egs_torch_ext/gsplat_cuda/gsplat_cuda.so', 'wb').write(lzma.decompress(open('.carry3/gsplat_cuda.so.xz', 'rb').read()))" || exit 1
export PYTHONPATH=/tmp/site:$PWD TORCH_EXTENSIONS_DIR=/tmp/egs_torch_ext PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 benchmarks/train_quality_gpu.py device --clip lieu --name lieu_init --features lieu_mel --carry .carry3 \
  --iterations 0 --minutes 1 --workers 4 --work "$WORK" --set loss.perceptual=0 2>&1 | grep '^{' | cut -c1-400
for mode in no yes; do
  echo "== render process: $mode"
  python3 benchmarks/serve_load.py "$WORK/lieu_init/model" --device cuda --dataset /tmp/egs_ds/lieu_init \
    --audio .carry3/speech_60s_16k.wav --levels "$LEVELS" --seconds 8 --stop-below 0 --render-process "$mode" \
    --out "$OUT/serve_load_process_$mode.json" 2>&1 | grep -v "egstalker.serve: session"
done
