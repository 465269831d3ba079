#!/usr/bin/env bash
# Create a Cloud TPU VM, install xraytpu, convert a local image folder to GCS,
# and train on the TPU. Edit the defaults or pass flags; --dry_run prints every
# command without running anything.
#
#   launch/tpu_vm.sh --project=my-proj --bucket=my-bucket --images=./chest_xray \
#       --name=xray-tpu --zone=us-central1-a --accelerator_type=v3-8 --dry_run
#
# Needs: gcloud (authenticated), a GCS bucket the TPU service account can read
# and write (roles/storage.objectAdmin on the bucket), TPU quota in the zone.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch/common.sh
source "$here/common.sh"

PROJECT=""; BUCKET=""; IMAGES=""; DATASET="chest_xray"; RUN_NAME="run1"
NAME="xraytpu"; ZONE="us-central1-a"; ACCELERATOR_TYPE="v3-8"
RUNTIME="tpu-ubuntu2204-base"        # `gcloud compute tpus versions list --zone=ZONE`
MODEL="inception_v3"; IMAGE_SIZE=299; BATCH_SIZE=128; EPOCHS=20
REPO="https://github.com/YOUR_ORG/xraytpu.git"

for arg in "$@"; do
  case $arg in
    --project=*) PROJECT=${arg#*=} ;;
    --bucket=*) BUCKET=${arg#*=} ;;
    --images=*) IMAGES=${arg#*=} ;;
    --dataset=*) DATASET=${arg#*=} ;;
    --run_name=*) RUN_NAME=${arg#*=} ;;
    --name=*) NAME=${arg#*=} ;;
    --zone=*) ZONE=${arg#*=} ;;
    --accelerator_type=*) ACCELERATOR_TYPE=${arg#*=} ;;
    --runtime=*) RUNTIME=${arg#*=} ;;
    --model=*) MODEL=${arg#*=} ;;
    --image_size=*) IMAGE_SIZE=${arg#*=} ;;
    --batch_size=*) BATCH_SIZE=${arg#*=} ;;
    --epochs=*) EPOCHS=${arg#*=} ;;
    --repo=*) REPO=${arg#*=} ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) die "unknown argument: $arg (see --help)" ;;
  esac
done
need PROJECT --project; need BUCKET --bucket; need IMAGES --images

DATA="gs://$BUCKET/datasets/$DATASET"
RUN="gs://$BUCKET/runs/$DATASET/$RUN_NAME"

# 1. Convert on this machine (CPU-bound; uses every core), straight to GCS.
run python -m tfrecord_tools.convert --input_dir="$IMAGES" --output_dir="$DATA" --max_side=1024
# 2. The TPU VM.
run gcloud compute tpus tpu-vm create "$NAME" --project="$PROJECT" --zone="$ZONE" \
  --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME"
# 3. Install: TensorFlow for TPU (with libtpu) and tf-keras, then xraytpu.
INSTALL="set -e; git clone -q $REPO xraytpu || true; cd xraytpu && $INSTALL_TPU"
run gcloud compute tpus tpu-vm ssh "$NAME" --project="$PROJECT" --zone="$ZONE" --command="$INSTALL"
# 4. Train on the TPU: data and run directory on GCS (preemption-safe: rerun the same command).
TRAIN="cd xraytpu && python3 -m xraytpu.train --strategy=tpu --tpu=local --data_dir=$DATA --model_dir=$RUN \
--model=$MODEL --image_size=$IMAGE_SIZE --batch_size=$BATCH_SIZE --epochs=$EPOCHS --steps_per_execution=32 --cache=memory"
run gcloud compute tpus tpu-vm ssh "$NAME" --project="$PROJECT" --zone="$ZONE" --command="$TRAIN"
# 5. Evaluate (threshold from val, report on test), then delete the VM so it stops billing.
run gcloud compute tpus tpu-vm ssh "$NAME" --project="$PROJECT" --zone="$ZONE" \
  --command="cd xraytpu && python3 -m xraytpu.evaluate --model_dir=$RUN --split=test"
run gcloud compute tpus tpu-vm delete "$NAME" --project="$PROJECT" --zone="$ZONE" --quiet
