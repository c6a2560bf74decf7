#!/usr/bin/env bash
# The test-section benchmark of a zoo checkpoint against random init (every task of benchmark=em,
# linear / MLP / kNN probes, 1 / 10 / 100 % of the labels, 3 seeds; each random-init seed its own
# network), each encoder's features (final output or U-Net level hypercolumn; a third choice such
# as [0,1,2,3,4], the hypercolumn and the decoder output, can be given) chosen on the validation
# sections first. From the repository root:
#   bash experiments/foundation/benchmark_test.sh [ZOO_NAME] [RUN_DIR] [BLOCKS_CHOICES]
set -euo pipefail
NAME=${1:-em_unet16}
RUN=${2:-runs/foundation/benchmark_test}
CHOICES=${3:-"[[],[0,1,2,3]]"}
nice -n 5 .venv/bin/emfm probe "checkpoints=[random,zoo:$NAME]" benchmark=em \
  "benchmark.blocks_choices=$CHOICES" trainer.progress=false hydra.run.dir="$RUN"
