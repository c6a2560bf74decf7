#!/usr/bin/env bash
# Pretraining on a lent GPU machine for a fixed wall-clock budget, from the repository root there:
#   bash experiments/foundation/device_pretrain.sh RUN_DIR SECONDS WHEEL_DIR OUT_DIR [OVERRIDE...]
# The machine's image holds JAX with CUDA but not all of emfm's dependencies, and reaches no package
# index: WHEEL_DIR holds the missing ones as wheels (flax, orbax-checkpoint, optax, chex, hydra-core,
# omegaconf, antlr4 at the versions the run is recorded with), installed into a private folder ahead
# of the image's packages. `data=corpus` reads $EMFM_CORPUS_DIR, built beforehand where ../shared is
# (the GPU machine does not have it; a built corpus needs no source files).
#
# The step budget is measured, not guessed: a 200-step run of the same configuration gives the
# throughput (loader and device together), and the real run gets the steps that fit in what is left
# of SECONDS (so its learning-rate and EMA schedules end where they should); `timeout` stops it
# before SECONDS in any case, and its last checkpoint is kept. The run directory (config, metrics,
# the last checkpoint) is packed into OUT_DIR as run.tar.part-* (15 MB pieces; `cat` them together).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: bash $0 RUN_DIR SECONDS WHEEL_DIR OUT_DIR [OVERRIDE...]" >&2
  exit 2
fi
RUN=$1
SECS=$2
WHL=$3
OUT=$4
shift 4
[[ "$SECS" =~ ^[0-9]+$ ]] || { echo "SECONDS=$SECS: give a whole number of seconds" >&2; exit 2; }
ls "$WHL"/*.whl >/dev/null 2>&1 || { echo "WHEEL_DIR=$WHL: no wheels there" >&2; exit 2; }
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $((SECS - ($(date +%s) - T0))); }

SITE=$(mktemp -d)  # the wheels' private install folder, ahead of the image's packages
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$WHL"/*.whl
export PYTHONPATH=$SITE:$PWD
EMFM_PY='import sys; from emfm.cli.main import main; sys.argv[0] = "emfm"; main()'
emfm() { python3 -c "$EMFM_PY" "$@"; }
python3 -c 'import jax, flax, orbax.checkpoint, tensorstore; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

COMMON=(data=corpus trainer.progress=false trainer.tensorboard=false "$@")
BATCH=$(python3 - "${COMMON[@]}" <<'EOF'
import sys
from emfm.config.schema import compose
print(compose("pretrain", sys.argv[1:]).data.batch_size)
EOF
)

# 1. throughput: 200 steps of the same configuration
emfm pretrain "${COMMON[@]}" trainer.steps=200 trainer.log_every=50 trainer.checkpoint_every=100000 \
  hydra.run.dir="$RUN.rate" > "$OUT/rate.log" 2>&1 || { tail -40 "$OUT/rate.log"; exit 1; }
RATE=$(python3 -c "import json; print(json.load(open('$RUN.rate/pretrain_summary.json'))['images_per_s'])")
COMPILE=$(python3 -c "import json; s = json.load(open('$RUN.rate/pretrain_summary.json')); print(int(s['total_s'] - s['train_s']))")
# 2. the real run: the steps that fit in what is left, less start-up (as measured) and packing
TRAIN_S=$(($(left) - COMPILE - 60))
STEPS=$(python3 -c "print(max(200, int(0.92 * $RATE * $TRAIN_S / $BATCH) // 100 * 100))")
echo "throughput ${RATE} crops/s at batch ${BATCH}; start-up ${COMPILE} s; ${TRAIN_S} s left to train: ${STEPS} steps"
set +e
timeout $(($(left) - 40)) python3 -c "$EMFM_PY" pretrain "${COMMON[@]}" trainer.steps="$STEPS" trainer.log_every=100 \
  trainer.checkpoint_every=1000 trainer.keep_checkpoints=1 hydra.run.dir="$RUN" > "$OUT/pretrain.log" 2>&1
echo "pretrain exit status $?"
set -e
tail -3 "$OUT/pretrain.log"
# 3. pack the run directory with its last checkpoint
last=$(ls "$RUN/checkpoints" | sort -n | tail -1)
tar -cf - --exclude=tb -C "$(dirname "$RUN")" "$(basename "$RUN")" |
  split -b 15M - "$OUT/run.tar.part-"
ls -la "$OUT"
echo "last checkpoint: step $last"
