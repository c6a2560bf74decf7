#!/usr/bin/env bash
# Several pretraining runs side by side on one lent GPU, each for the same wall-clock budget:
#   bash experiments/foundation/device_sweep.sh SECONDS WHEEL_DIR OUT_DIR SPEC_FILE
# SPEC_FILE: one run per line, "NAME OVERRIDE...", e.g.
#   w16_hc recipe=unet_dino_dense_weak_hc data.batch_size=64
# ('#' starts a comment; overrides are split at spaces and not unquoted: write
# data.sources.7.source_sections=[0,2], without quotes). Each line runs experiments/foundation/device_pretrain.sh RUNS/NAME SECONDS
# WHEEL_DIR OUT_DIR/NAME OVERRIDE... at the same time as the others. A small U-Net's run is held
# back by its host-side work (loader, step dispatch), not by the GPU: four width-16 runs side by
# side on an H200 trained 7954 crops/s together, one alone 3238 (experiments/foundation/README.md),
# so N recipes on a machine with N or more cores take little more than the time of one. Each
# process gets an equal share of the GPU's memory. Run
# directories go under $EMFM_SWEEP_RUNS (default runs/foundation); every run's output (logs, the
# packed run directory) under NAME/ inside OUT_DIR/sweep.tar.part-* (15 MB pieces; `cat` them into
# `tar -xf -`). The exit status is that of the first run that failed.
set -euo pipefail
if [ $# -ne 4 ]; then
  echo "usage: bash $0 SECONDS WHEEL_DIR OUT_DIR SPEC_FILE" >&2
  exit 2
fi
SECS=$1
WHL=$2
OUT=$3
SPEC=$4
[ -f "$SPEC" ] || { echo "SPEC_FILE=$SPEC: not a file" >&2; exit 2; }
RUNS=${EMFM_SWEEP_RUNS:-runs/foundation}
HERE=$(dirname "$0")

mapfile -t lines < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$SPEC")
n=${#lines[@]}
[ "$n" -gt 0 ] || { echo "SPEC_FILE=$SPEC: no runs in it" >&2; exit 2; }
declare -A seen=()
for line in "${lines[@]}"; do
  read -r name _ <<<"$line"
  [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "$SPEC: run name '$name' (letters, digits, _ . - only)" >&2; exit 2; }
  [ -z "${seen[$name]:-}" ] || { echo "$SPEC: run name '$name' given twice" >&2; exit 2; }
  seen[$name]=1
done
# an equal share of the device's memory for each process (JAX takes 75 % by default)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-$(python3 -c "print(round(0.9 / $n, 3))")}
echo "$n runs of $SECS s side by side, memory fraction $XLA_PYTHON_CLIENT_MEM_FRACTION each"

pids=()
names=()
for line in "${lines[@]}"; do
  read -r -a words <<<"$line"
  name=${words[0]}
  mkdir -p "$OUT/$name"
  bash "$HERE/device_pretrain.sh" "$RUNS/$name" "$SECS" "$WHL" "$OUT/$name" "${words[@]:1}" \
    > "$OUT/$name/device.log" 2>&1 &
  pids+=($!)
  names+=("$name")
done
status=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "${names[$i]}: done"
  else
    rc=$?
    echo "${names[$i]}: failed (exit status $rc); the end of its log:"
    tail -15 "$OUT/${names[$i]}/device.log"
    [ "$status" -ne 0 ] || status=$rc
  fi
  grep -h "throughput\|last checkpoint\|pretrain exit" "$OUT/${names[$i]}/device.log" || true
done
# one stream of 15 MB pieces for everything (the device tool brings back a limited number of files):
#   cat OUT_DIR/sweep.tar.part-* | tar -xf -   gives NAME/device.log, NAME/run.tar.part-*, ...
(cd "$OUT" && tar -cf - "${names[@]}" | split -b 15M - sweep.tar.part- && rm -rf "${names[@]}")
ls -la "$OUT"
exit "$status"
