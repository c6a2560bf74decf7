#!/usr/bin/env bash
# Data-wait fraction of the main job's pretraining recipe of commits d53d6eb / f2016f2 (their
# configs/main.yaml: model, objective, optim, data) before (BASE: a checkout of the commit before
# the change) and after (AFTER, default this tree). Both run with the emfm environment of this tree
# (VENV, default .venv beside this tree's emfm/), importing emfm from their own checkout. The
# machine is shared and its load swings by 10x within minutes, so each repeat runs the two side by
# side, at the same moment (STEPS steps each, REPEATS pairs, one after the other).
# Usage: BASE=CHECKOUT_BEFORE [AFTER=CHECKOUT_AFTER] [VENV=DIR] [STEPS=150] [REPEATS=2] \
#          bash experiments/device_normalisation/measure.sh OUT_DIR
set -euo pipefail
out=${1:?out dir}; base=${BASE:?checkout of the commit before}; repeats=${REPEATS:-2}; steps=${STEPS:-150}
mkdir -p "$out"; out=$(cd "$out" && pwd)  # the runs start in their checkouts
repo=$(cd "$(dirname "$0")/../.." && pwd)
here=$(cd "${AFTER:-$repo}" && pwd); base=$(cd "$base" && pwd); venv=${VENV:-$repo/.venv}
recipe=(model=vit_ti_p8 objective=mae data=bundled optim=adamw model.width=128 model.depth=4 model.heads=4
        objective.decoder_width=64 objective.decoder_depth=1 objective.decoder_heads=2 objective.target_norm=image
        optim.lr=1.5e-3 optim.scale_lr_by_batch=false optim.warmup_steps=50 trainer.steps=$steps trainer.log_every=25
        trainer.progress=false trainer.tensorboard=false)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$out/jax-cache}  # repeats skip the compile
mkdir -p "$out"
for i in $(seq 1 "$repeats"); do
  pids=()
  for which in before after; do
    src=$here; [ "$which" = before ] && src=$base
    dir="$out/${which}_$i"; rm -rf "$dir"
    (cd "$src" && PYTHONPATH=$src nice -n 10 "$venv/bin/emfm" pretrain "${recipe[@]}" "hydra.run.dir=$dir" \
       > "$dir.log" 2>&1) &
    pids+=($!)
  done
  wait "${pids[@]}"
  for which in before after; do
    python3 - "$out/${which}_$i" "${which}_$i" <<'PY'
import json, sys
d, run = sys.argv[1:]
s = json.load(open(f"{d}/pretrain_summary.json"))
w = [json.loads(l)["data_wait_fraction"] for l in open(f"{d}/metrics.jsonl")]
print(json.dumps({"run": run, "data_wait_fraction": s["data_wait_fraction"], "images_per_s": s["images_per_s"],
                  "train_s": s["train_s"], "compile_s": s["compile_s"], "final_loss": s["final_loss"],
                  "window_wait": [round(x, 4) for x in w]}))
PY
  done
done
