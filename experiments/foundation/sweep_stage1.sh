#!/usr/bin/env bash
# Stage 1 of the recipe sweep: 11 recipes (configs/recipe/) at about 4 minutes of a 2-core CPU each,
# on the corpus (configs/data/corpus.yaml), then ranked on validation sections. Run from the repository root:
#   bash experiments/foundation/sweep_stage1.sh [SWEEP_DIR]
set -euo pipefail
SWEEP=${1:-multirun/foundation/stage1}
RECIPES=${2:-vit8_mae,vit4_mae,vit8_dino,vit8_dino_dense,vit8_dense,unet_mim,unet_dense,unet_dino_dense,unet_dino_dense_crop128,unet_dino_dense_strong,unet_dino_dense_weak}
# one run directory per recipe: SWEEP/<recipe>
nice -n 5 .venv/bin/emfm pretrain -m data=corpus recipe="$RECIPES" \
  trainer.progress=false trainer.log_every=25 hydra.sweep.dir="$SWEEP" 'hydra.sweep.subdir=${hydra:runtime.choices.recipe}'
.venv/bin/emfm runs summarize "$SWEEP"
