#!/usr/bin/env bash
# The winning recipe of the sweep trained for longer on the corpus, checkpointing every 250 steps;
# rerunning the same command resumes from the last checkpoint. From the repository root:
#   bash experiments/foundation/long_run.sh [RUN_DIR] [RECIPE] [STEPS] [START_CHECKPOINT] [OVERRIDE...]
# START_CHECKPOINT (a run directory or zoo:NAME, or '' for none) continues pretraining from that
# encoder; further arguments are Hydra overrides (e.g. model.width=32).
set -euo pipefail
RUN=${1:-runs/foundation/long}
RECIPE=${2:-unet_dino_dense_weak}
STEPS=${3:-5000}
START=${4:-}
shift $(( $# < 4 ? $# : 4 ))
nice -n 5 .venv/bin/emfm pretrain data=corpus recipe="$RECIPE" trainer.steps="$STEPS" \
  trainer.checkpoint_every=250 trainer.keep_checkpoints=3 trainer.log_every=50 trainer.progress=false \
  objective.ema_momentum=0.996 ${START:+checkpoint="$START"} hydra.run.dir="$RUN" "$@"
