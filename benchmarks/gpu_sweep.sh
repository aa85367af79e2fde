#!/usr/bin/env bash
# Training runs that share one GPU, in two device calls (each call may last 10 minutes; the runs last longer).
#
#   SWEEP=NAME bash benchmarks/gpu_sweep.sh start MINUTES
#                                                  call 1: gsplat build (its .so back through $OUT) unless .carry
#                                                  holds it, launch every run of benchmarks/sweeps/NAME.txt in its
#                                                  own process session (they outlive the call), follow them until
#                                                  CALL_S; ITERATIONS (6000) and WORKERS (1) per run; RENDERS
#                                                  png (lossless, 9-13 MB a run) or jpeg (q97): at most 8 files
#                                                  and 64 MiB come back, so jpeg beyond two runs with CONTROLS=1
#                                                  (each run's controls add ~10 MB) or four without
#   bash benchmarks/gpu_sweep.sh finish            call 2 (within 30 s of call 1, so the machine stays): wait for
#                                                  the runs, LPIPS on the device, results back through $OUT; with
#                                                  CONTROLS=1 each run's lip-sync control renders (score them with
#                                                  lipsync_control.py --from-renders); then the
#                                                  SERVE_RUNS' models' serving load (if set; a whisper model
#                                                  hears through .carry2/whisper_l3.bin.xz: audio.whisper.
#                                                  write_encoder_weights); then render speed of RENDER_RUN's
#                                                  model at 512x512 (if set)
#   bash benchmarks/gpu_sweep.sh serve RUN...      call 3: serving load (sessions held at 25 fps, latency, GPU
#                                                  memory) of each named run's model
#
# Carried: .whl (gsplat wheel), $CARRY (default .carry: packed datasets, feature overlays, int8 VGG16: train_quality_gpu.py
# pack / pack-weights); call 2 also .carry2/alexnet.ckpt (LPIPS) and .render_bench (render_speed.py --make-carry
# + speech_60s_16k.wav), call 3 .render_bench. serve reads SPEECH (a 16 kHz wav; default in .render_bench) and
# WHISPER_XZ (default .carry2/whisper_l3.bin.xz) when they are elsewhere. Runs live in .gpu_work/ (git-ignored, kept
# on the machine between calls). Each run's log: .gpu_work/NAME.log.
set -uo pipefail
OUT=${OUT:-/tmp/out}
WORK=$PWD/.gpu_work
mkdir -p "$OUT" "$WORK" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export TORCH_EXTENSIONS_DIR=$PWD/.torch_ext TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1
CARRY=${CARRY:-.carry}  # the carried folder of packed datasets, int8 VGG16 and the prebuilt gsplat .so

# The runs: benchmarks/sweeps/$SWEEP.txt, one per line: name clip features(-: the dataset's own) overrides...
SWEEP=${SWEEP:-encoders}
[ -f "benchmarks/sweeps/$SWEEP.txt" ] || { echo "no benchmarks/sweeps/$SWEEP.txt: set SWEEP to one of them" >&2; exit 2; }
mapfile -t RUNS < <(grep -v '^\s*\(#\|$\)' "benchmarks/sweeps/$SWEEP.txt")

follow() {  # print progress until every run has written summary.json or died, or $1 seconds have passed
  local until=$((SECONDS + $1))
  while [ $SECONDS -lt $until ]; do
    local alive=0
    for log in "$WORK"/*.log; do  # a run is alive while its process is (setsid may have forked: match by name)
      pgrep -f -- "--name $(basename "$log" .log) " >/dev/null && alive=$((alive + 1))
    done
    echo "-- t=${SECONDS}s alive=$alive $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
    for log in "$WORK"/*.log; do echo "   $(basename "$log" .log): $(tr '\r' '\n' <"$log" | grep -v '^\s*$' | tail -1 | cut -c1-150)"; done
    [ $alive -eq 0 ] && return 0
    sleep 30
  done
}

serve_load() {  # sessions held at 25 fps, latency and GPU memory of run $1's model
  echo "== serve $1"
  local speech=${SPEECH:-.render_bench/speech_60s_16k.wav} xz=${WHISPER_XZ:-.carry2/whisper_l3.bin.xz} weights=()
  # a whisper model hears through the encoder blocks that travel (audio.whisper.write_encoder_weights, xz)
  if [ -f "$xz" ]; then
    python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.decompress(open(sys.argv[1], 'rb').read()))" \
      "$xz" /tmp/whisper_l3.bin && weights=(--audio-weights /tmp/whisper_l3.bin)
  fi
  PYTHONPATH=$PYTHONPATH:$PWD/.render_bench/oww python3 benchmarks/serve_load.py "$WORK/$1/model" --device cuda \
    --dataset "/tmp/egs_ds/$1" --audio "$speech" --levels "${LEVELS:-1,8,16,24,32}" \
    --seconds 8 "${weights[@]}" --out "$OUT/serve_load_$1.json"
}

if [ "${1:-}" = "start" ]; then
  MINUTES=${2:-11}
  exec > >(tee "$OUT/sweep_start_log.txt") 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
  rm -rf "$WORK"; mkdir -p "$WORK"
  SECONDS=0
  SO=.torch_ext/gsplat_cuda/gsplat_cuda.so
  PREBUILT=no
  if [ -f "$CARRY/gsplat_cuda.so.xz" ] && [ ! -f "$SO" ]; then  # the .so an earlier call built (pack-weights)
    mkdir -p "$(dirname "$SO")" && PREBUILT=yes
    python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.decompress(open(sys.argv[1], 'rb').read()))" \
      "$CARRY/gsplat_cuda.so.xz" "$SO" || exit 1
  fi
  python3 benchmarks/gsplat_warmup.py
  echo "gsplat ready after ${SECONDS} s (prebuilt: $PREBUILT)"
  [ -f "$SO" ] && [ $PREBUILT = no ] && sha256sum "$SO" && gzip -1 -c "$SO" | split -b 15M - "$OUT/gsplat_cuda.so.gz.part-"
  for run in "${RUNS[@]}"; do
    read -r name clip features overrides <<<"$run"
    sets=()
    for o in $overrides; do  # SECTION.FIELD=VALUE config overrides; --flag=VALUE goes to train_quality_gpu.py as is
      case $o in --*) sets+=("$o") ;; *) sets+=(--set "$o") ;; esac
    done
    feat=()
    [ "$features" != "-" ] && feat=(--features "$features")
    setsid nohup python3 benchmarks/train_quality_gpu.py device --clip "$clip" --name "$name" "${feat[@]}" \
      "${sets[@]}" --minutes "$MINUTES" --iterations "${ITERATIONS:-6000}" --workers "${WORKERS:-1}" --renders "${RENDERS:-png}" --carry "$CARRY" --work "$WORK" >"$WORK/$name.log" 2>&1 </dev/null &
    echo "launched $name: clip=$clip features=$features $overrides"
  done
  follow $((${CALL_S:-560} - SECONDS))  # return before the call's 10-minute limit; the runs go on
elif [ "${1:-}" = "finish" ]; then
  exec > >(tee "$OUT/sweep_finish_log.txt") 2>&1
  follow "${WAIT_S:-420}"
  if [ -f .carry2/alexnet.ckpt ]; then
    mkdir -p /tmp/egs_lpips && cp .carry2/alexnet.ckpt /tmp/egs_lpips/
    EGSTALKER_LPIPS_WEIGHTS=/tmp/egs_lpips python3 benchmarks/train_quality_gpu.py lpips --work "$WORK"
  else  # `train_quality_gpu.py score` then scores LPIPS here, from the returned lossless renders
    echo "no .carry2/alexnet.ckpt carried: LPIPS left to the local score step"
  fi
  for log in "$WORK"/*.log; do echo "== $log"; tr '\r' '\n' <"$log" | grep -v '^\s*$' | tail -4; done
  # the renders (PNG: 9-13 MB a run) in parts under the 16 MiB a returned file may hold; here:
  # mkdir -p DIR && cat sweep_results.tgz.part-* | tar xz -C DIR
  (cd "$WORK" && tar czf - ./*.log ./*/summary.json ./*/renders_*.npz) | split -b 15M - "$OUT/sweep_results.tgz.part-"
  if [ "${CONTROLS:-0}" = 1 ]; then  # lip-sync control renders of every run, scored later with MediaPipe
    for model in "$WORK"/*/model; do
      name=$(basename "$(dirname "$model")")
      python3 benchmarks/lipsync_control.py "$model" --dataset "/tmp/egs_ds/$name" --device cuda \
        --save-renders "$OUT/controls_$name.npz"
    done
  fi
  for RUN in ${SERVE_RUNS:-}; do serve_load "$RUN"; done
  RUN=${RENDER_RUN:-}
  [ -z "$RUN" ] && { ls -la "$OUT"; exit 0; }
  tar xJf .render_bench/av.tar.xz -C /tmp/site || exit 1
  PYTHONPATH=$PYTHONPATH:$PWD/.render_bench/oww python3 benchmarks/render_speed.py "$WORK/$RUN/model" --device cuda \
    --size 512 --dataset "/tmp/egs_ds/$RUN" --audio .render_bench/speech_60s_16k.wav --batch-sizes 1 8 32 \
    --frames 512 --e2e-seconds 60 --json "$OUT/render_gpu.json"
  ls -la "$OUT"
elif [ "${1:-}" = "serve" ]; then
  shift
  exec > >(tee "$OUT/sweep_serve_log.txt") 2>&1
  for RUN in "$@"; do serve_load "$RUN"; done
else
  echo "usage: gpu_sweep.sh start MINUTES | finish | serve RUN..." >&2
  exit 2
fi
