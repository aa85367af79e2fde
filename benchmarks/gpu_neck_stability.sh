#!/usr/bin/env bash
# One device call: neck and chin/neck seam stability (benchmarks/neck_stability.py) of a trained model, with its
# own audio and with new speech, on held-out poses and on the `loop` schedule over the training poses; measured
# over the dataset's torso images as task 6 makes them now, and (VARIANTS="new old") over the ones it made before
# the seam fix (egstalker.preprocess.torso.under_the_chin).
#
# Either a carried model is measured, or (MINUTES set) the clip is trained first over today's torso images
# (train_quality_gpu.py device; SET="seed=4 loss.perceptual=0" passes overrides, FEATURES another encoder's
# carried aud.npy + meta.json), and its summary and held-out renders come back for local scoring (`score`).
#
#   CLIP=lieu bash benchmarks/gpu_neck_stability.sh                       (carry .whl .carry_neck; ~3 minutes)
#       the carried lieu model (whisper, seed 4, 115k Gaussians, trained over the old torso images)
#   CLIP=obama MINUTES=1.5 FEATURES=obama_wh CARRY=.carry_neck_obama VARIANTS=new bash benchmarks/gpu_neck_stability.sh
#       (carry .whl .carry_neck_obama) trains obama first
#   CLIP=lieu MINUTES=2.5 SET="seed=4 loss.perceptual=0" CARRY=.carry_retrain_lieu VARIANTS=new NAME=lieu_retrained \
#     bash benchmarks/gpu_neck_stability.sh    (carry .whl .carry_retrain_lieu) retrains the carried model's recipe
#
# .carry_neck: gsplat_cuda.so.xz, model/, lieu/ (train_quality_gpu.py pack of the whisper dataset with today's
# torso images, without lms.npz/track_params.pt), lieu_old_torso/ (the earlier torso.mp4/torso_alpha.npz with the
# small files), speech60_wh.npy (../shared/data/audio/speech_60s_16k.wav: neck_stability.py features).
# .carry_neck_obama: gsplat_cuda.so.xz, vgg16_int8.pkl, obama/ (a full pack), obama_wh/, obama_old_torso/,
# speech60_wh.npy. .carry_retrain_CLIP: gsplat_cuda.so.xz, [vgg16_int8.pkl,] CLIP/ (a full pack of the whisper
# dataset), speech60_wh.npy.
set -uo pipefail
OUT=${OUT:-/tmp/out}
CLIP=${CLIP:-lieu}
NAME=${NAME:-$CLIP}           # names the outputs: neck_stability_h200_$NAME*.json
VARIANTS=${VARIANTS-new old}  # new: today's torso images only; empty: train and score only
if [ "$CLIP" = lieu ]; then CARRY=${CARRY:-.carry_neck}; else CARRY=${CARRY:-.carry_neck_obama}; fi
WORK=$PWD/.gpu_work
mkdir -p "$OUT" "$WORK" /tmp/site
exec > >(tee "$OUT/neck_${NAME}_log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
SECONDS=0
if [ -z "${MINUTES:-}" ]; then
  [ -f "$CARRY/model/model.pt" ] || { echo "no trained model in $CARRY/model: carry one, or set MINUTES to train $CLIP first"; exit 1; }
  mkdir -p /tmp/egs_torch_ext/gsplat_cuda
  python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.decompress(open(sys.argv[1], 'rb').read()))" \
    "$CARRY/gsplat_cuda.so.xz" /tmp/egs_torch_ext/gsplat_cuda/gsplat_cuda.so || exit 1
  MODEL=$CARRY/model
  DATA=/tmp/egs_ds/${NAME}_neck
  rm -rf "$DATA"
  python3 benchmarks/train_quality_gpu.py unpack "$CARRY/$CLIP" "$DATA" || exit 1
else
  echo "== train $CLIP, $MINUTES minutes, overrides: ${SET:-none} (t=${SECONDS}s)"
  args=()
  for o in ${SET:-}; do args+=(--set "$o"); done
  [ -n "${FEATURES:-}" ] && args+=(--features "$FEATURES")
  run=${NAME}_neck_train
  python3 benchmarks/train_quality_gpu.py device --clip "$CLIP" --name "$run" --minutes "$MINUTES" \
    --carry "$CARRY" --work "$WORK" ${args[@]+"${args[@]}"} > "$WORK/${NAME}_train.log" 2>&1
  rc=$?
  tr '\r' '\n' < "$WORK/${NAME}_train.log" | grep -v "^training: \|^initialising Gaussians: \|^ *$" > "$OUT/neck_${NAME}_train_log.txt"  # no tqdm redraws
  tail -4 "$OUT/neck_${NAME}_train_log.txt"
  [ $rc = 0 ] || exit 1
  mkdir -p "$OUT/run/$run"
  cp "$WORK/$run/summary.json" "$WORK/$run"/renders_*.npz "$OUT/run/$run/" || exit 1  # `score` reads these locally
  MODEL=$WORK/$run/model
  DATA=/tmp/egs_ds/$run
fi
export TORCH_EXTENSIONS_DIR=/tmp/egs_torch_ext  # the prebuilt gsplat .so (training unpacks it there too)
# the same dataset with the torso images task 6 made before the seam fix (parsing and ground truth are shared)
OLD=${DATA}_old_torso
if [[ "$VARIANTS" == *old* ]]; then
  rm -rf "$OLD"
  python3 benchmarks/train_quality_gpu.py unpack "$CARRY/${CLIP}_old_torso" "$OLD" || exit 1
  rm -rf "$OLD/parsing" "$OLD/gt_imgs" && cp -r "$DATA/parsing" "$DATA/gt_imgs" "$OLD/"
fi
for variant in $VARIANTS; do
  data=$DATA suffix=""
  [ $variant = old ] && data=$OLD suffix=_old_torso
  echo "== measure over the $variant torso images (t=${SECONDS}s)"
  python3 benchmarks/neck_stability.py measure "$MODEL" --dataset "$data" \
    --speech-features "$CARRY/speech60_wh.npy" --device cuda --json "$OUT/neck_stability_h200_${NAME}$suffix.json" \
    --sheet "$OUT/neck_stability_h200_${NAME}$suffix.jpg" || exit 1
done
echo "done after ${SECONDS}s"
ls -laR "$OUT"
