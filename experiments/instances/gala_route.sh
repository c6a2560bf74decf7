#!/usr/bin/env bash
# The fine-tuned 3D neuron route on the gala FIB-SEM volumes, from the CLI only: a 2D U-Net trained
# on the boundaries of the train volume's sections 0-39, its probabilities on the train volume's
# validation sections 40-49 (SPLIT below) and on the separate test volume, 3D instances with their parameters
# chosen on the validation sections (`instances.tune_input`), scored once on the test volume.
# From the repository root:
#   bash experiments/instances/gala_route.sh [WORK_DIR] [GALA_DIR] [METHOD] [OVERRIDE...]
# METHOD: multicut | agglomeration | watershed | link2d; further arguments are `emfm finetune`
# overrides (e.g. trainer.steps=600 model.width=32; a 3D network: model=unet3d
# data.patch_shape=[16,64,64] with WINDOW=[16,64,64] OVERLAP=[4,16,16] CHUNK=[50,128,256] in the
# environment for prediction; TTA=flips or TTA=dihedral predicts with test-time augmentation,
# `predict.tta`, into outputs named *_tta_<mode>; SPLIT=35 trains on sections 0-34 and
# validates on 35-49 instead of 0-39 / 40-49). Rerunning resumes every stage; a finished stage is
# kept (delete WORK_DIR/<stage> to redo it).
set -euo pipefail
W=${1:-runs/gala3d}
G=${2:-../shared/data/em/gala_fibsem}
METHOD=${3:-multicut}
shift $(( $# < 3 ? $# : 3 ))
EMFM=".venv/bin/emfm"
RUN="nice -n 10 /usr/bin/env time -f %e_s_%M_kB"
SPLIT=${SPLIT:-40}  # sections 0..SPLIT-1 train, SPLIT..49 validation
VAL="[[$SPLIT,50],[0,100],[0,200]]"
WINDOW=${WINDOW:-[1,96,96]}
OVERLAP=${OVERLAP:-[0,32,32]}
CHUNK=${CHUNK:-[1,256,256]}
TTA=${TTA:-none}
S=""; [ "$TTA" = none ] || S="_tta_$TTA"
mkdir -p "$W"

for k in train test; do  # 1. the TIFF volumes as OME-Zarr (10 nm voxels)
  [ -e "$W/$k.zarr" ] || $EMFM data import "$G/${k}_image.tif" "$W/$k.zarr" --voxel-size 10 10 10 --no-progress
  [ -e "$W/${k}_labels.zarr" ] || $EMFM data import "$G/${k}_labels.tif" "$W/${k}_labels.zarr" \
    --labels --voxel-size 10 10 10 --no-progress
done

# 2. fine-tune: boundaries (label 0, or a different neuron in the 3x3 in-plane neighbourhood) of
#    sections 0-39, CE + Dice; the end-of-run scores are of the validation sections
[ -e "$W/finetune/finetune_summary.json" ] || $RUN $EMFM finetune model=unet2d head=unet \
  model.width=16 task=boundary task.label_type=instances task.distance=false \
  data.path="$W/train.zarr" data.labels="$W/train_labels.zarr" \
  "data.train_roi=[[0,$SPLIT],[0,100],[0,200]]" "data.test_roi=$VAL" "data.patch_shape=[1,96,96]" \
  data.batch_size=8 trainer.steps=1200 trainer.log_every=100 trainer.progress=false \
  optim.lr=3e-3 run_dir="$W/finetune" "$@"

# 3. boundary probabilities of the train volume (its validation sections are read), and 4. of the
#    test volume with instances whose parameters are chosen on the validation sections
$RUN $EMFM predict checkpoint="$W/finetune" predict.path="$W/train.zarr" \
  predict.out="$W/train_probs$S.zarr" "predict.window=$WINDOW" "predict.overlap=$OVERLAP" \
  "predict.chunk=$CHUNK" predict.tta="$TTA" \
  hydra.run.dir="$W/predict_val$S"
$RUN $EMFM predict checkpoint="$W/finetune" predict.path="$W/test.zarr" \
  predict.out="$W/test_probs$S.zarr" "predict.window=$WINDOW" "predict.overlap=$OVERLAP" \
  "predict.chunk=$CHUNK" predict.tta="$TTA" \
  predict.instances="$METHOD" instances.out="$W/test_$METHOD$S.zarr" \
  "instances.block=[50,100,200]" "instances.halo=[0,0,0]" instances.tune=true \
  instances.tune_input="$W/train_probs$S.zarr" instances.tune_labels="$W/train_labels.zarr" \
  "instances.tune_roi=$VAL" instances.tune_metric=voi \
  hydra.run.dir="$W/predict_test_$METHOD$S"

# 5. the test volume's neurons against its labels (label 0 = boundary, ignored)
$RUN $EMFM evaluate pred="$W/test_$METHOD$S.zarr" gt="$W/test_labels.zarr" \
  hydra.run.dir="$W/evaluate_$METHOD$S"
