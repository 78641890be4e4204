#!/usr/bin/env bash
# The study's three models and two more vgg16-transfer recipes over several CK+48 subject splits, as parallel
# jobs; prints one test-accuracy line per model and run. The split-to-split spread it shows is the yardstick
# for any claim that one model beats another on about 100 test images.
#
# usage: benchmarks/recipes.sh [SEED ...]
#   SEED: make_split.py seeds (default 0 3 7 42: four distinct subject splits; 0 is the reference split)
#   env: PAR parallel jobs (default 2; 11 on one GPU), WORK scratch folder (default /tmp/ferlab-recipes),
#        SHARED the shared folder (default ../shared), EXTRA more flags for every job (e.g. --precision 32)
# On a 2-core CPU the augmented recipe takes about 20 minutes per split; on one H200 all jobs take 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared} WORK=${WORK:-/tmp/ferlab-recipes} PAR=${PAR:-2} EXTRA=${EXTRA:-}
W=$SHARED/weights/vgg16_imagenet_features.pth
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 3 7 42)
jobs=()
for s in "${seeds[@]}"; do
  [ -d "$WORK/split$s" ] || python3 "$SHARED/peers/make_split.py" "$SHARED/datasets/ckplus48" "$WORK/split$s" --seed "$s" >/dev/null
  jobs+=("split$s study run $WORK/split$s --weights $W")
  jobs+=("split$s vgg-224-block5 train $WORK/split$s --model vgg16-transfer --weights $W --fine-tune-layers 3")
  jobs+=("split$s vgg-112-last6-augment train $WORK/split$s --model vgg16-transfer --weights $W --backbone-size 112 --fine-tune-layers 6 --augment fine-tune --max-epochs 40")
done
printf '%s\n' "${jobs[@]}" | xargs -P "$PAR" -I{} bash -c '
  set -- {}; tag="$1 $2"; shift 2
  out=$(python3 -m ferlab "$@" '"$EXTRA"' --no-progress --out "'"$WORK"'/runs" --name "${tag// /-}" 2>&1)
  echo "$out" | grep -E "test accuracy|^ferlab: error" | sed "s|^ferlab: |$tag: |"'
