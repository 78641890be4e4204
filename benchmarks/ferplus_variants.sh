#!/usr/bin/env bash
# Variants of configs/ferplus.yaml at a short schedule, one after another on the same seeded split (the FER2013
# training images with FER+'s votes; 85/10/5 stratified by majority): prints each variant's best validation
# accuracy (against the majority), its epoch and the wall time. The validation split chooses; nothing here
# reads the held-out test split's numbers.
#
# usage: benchmarks/ferplus_variants.sh [EPOCHS] [VARIANT ...]
#   EPOCHS: the schedule's length (default 10; the shipped recipe runs 60)
#   VARIANT: recipe | majority | size64 | smooth | medium | balanced (default: recipe majority size64)
#     smooth: the majority label with label smoothing 0.1 (the hard-label stand-in for a distribution)
#     medium: the wider vgg-medium (48-96-192-384 channels) instead of vgg-small
#     balanced: each class's loss weighted by its count to the power -0.5 (--class-balance 0.5)
#   env: WORK scratch folder (default /tmp/ferlab-ferplus), SHARED the shared folder (default ../shared)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared} WORK=${WORK:-/tmp/ferlab-ferplus}
EPOCHS=${1:-10}; shift || true
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(recipe majority size64)
declare -A flags=(
  [recipe]=""
  [majority]="--vote-target majority"
  [size64]="--image-size 64"
  [smooth]="--vote-target majority --label-smoothing 0.1"
  [medium]="--model vgg-medium"
  [balanced]="--class-balance 0.5"
)
for v in "${variants[@]}"; do
  start=$(date +%s)
  python3 -m ferlab train "$SHARED/datasets/fer2013/train" --labels "$SHARED/datasets/fer2013/ferplus_votes.csv" \
    --config configs/ferplus.yaml --max-epochs "$EPOCHS" ${flags[$v]} --no-progress --logger none \
    --out "$WORK" --name "$v-$EPOCHS" > "$WORK-$v-$EPOCHS.log" 2>&1 || { echo "$v: failed (log: $WORK-$v-$EPOCHS.log)"; continue; }
  run=$(ls -d "$WORK"/*-"$v-$EPOCHS"-vgg-* | tail -1)
  python3 - "$run" "$v" "$(( $(date +%s) - start ))" <<'PY'
import csv, sys
run, name, seconds = sys.argv[1:]
model = run.rsplit("-vgg-", 1)[1]
rows = list(csv.DictReader(open(f"{run}/vgg-{model}/epochs.csv")))
best = max(rows, key=lambda r: float(r["val_acc"]))
print(f"{name}: validation accuracy {float(best['val_acc']):.4f} (epoch {best['epoch']} of {len(rows)}), {seconds} s")
PY
done
