#!/usr/bin/env bash
# The long runs owed to a GPU (issue 30), started on the device machine so that they outlive one call:
#   bash scripts/gpu_runs.sh setup                 # wheels -> /tmp/site, every carried bundle -> /tmp/assets
#   bash scripts/gpu_runs.sh start JOB [JOB ...]   # each job in its own process session, logs in /tmp/gpu_runs/JOB
#   bash scripts/gpu_runs.sh wait SECONDS          # until every started job ended or SECONDS passed; then collect
#   bash scripts/gpu_runs.sh collect               # results -> $OUT (one tar.gz per job, without checkpoints)
# Jobs: resnet20_pruned, resnet20_control (100 epochs each, run side by side), efficientnet_qat, yolov5n_qat,
# gpu_timing (calibration per method, ResNet-20 sensitivity sweep and mixed precision, on the GPU).
# A device call carries 64 MiB: put the data in over several calls (each `setup` adds what it carries), and make
# the next call within the 30 s the machine stays warm, or /tmp (wheels, data, runs) is gone with it. Processes
# started with setsid run on between calls; a call's command must end within 10 minutes.
# CARRY (default: .carry under the current folder) holds whl*/ folders of wheels and folders of bundles
# (scripts/device_data.py pack); EPOCHS and QAT_EPOCHS override the lengths.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CARRY="${CARRY:-$PWD/.carry}"
WORK=/tmp/gpu_runs
ASSETS=/tmp/assets
PY="${PYTHON:-python3}"
export WORKBENCH_ASSETS="$ASSETS" WORKBENCH_NO_PROGRESS=1 PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

job_command() {
  local runs="$WORK/$1/runs"
  case "$1" in
    resnet20_pruned) echo "$PY benchmarks/prune.py resnet20 --ratios 0.5 --epochs ${EPOCHS:-100} --device cuda \
--runs $runs --set data.workers=6" ;;
    resnet20_control) echo "$PY benchmarks/prune.py resnet20 --control-only --epochs ${EPOCHS:-100} --device cuda \
--runs $runs --set data.workers=6" ;;
    efficientnet_qat) echo "$PY benchmarks/qat.py efficientnet_lite0 --device cuda --epochs ${QAT_EPOCHS:-10} \
--runs $runs --set data.workers=8" ;;
    yolov5n_qat) echo "$PY benchmarks/qat.py yolov5n --device cuda --epochs ${QAT_EPOCHS:-10} --runs $runs" ;;
    gpu_timing) echo "$PY benchmarks/calibration_time.py --device cuda && \
$PY benchmarks/sensitivity.py resnet20 --device cuda --runs $runs" ;;
    selftest) echo "$PY -c 'import torch; print(torch.cuda.is_available())'" ;;  # the start/wait/collect mechanics
    *) return 1 ;;
  esac
}

case "${1:-}" in
  setup)
    # Every wheel under $CARRY/whl*/ and every bundle under $CARRY/*/ that this machine has not taken yet: calls
    # that carry different folders add up (a marker per wheel folder and per bundle).
    for dir in "$CARRY"/whl*/; do
      marker="/tmp/site/.installed-$(basename "$dir")"
      if compgen -G "$dir*.whl" >/dev/null && [ ! -f "$marker" ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
          "$dir"*.whl && touch "$marker" || exit 1
      fi
    done
    for bundle in "$CARRY"/*/*.npz; do
      [ -f "$bundle" ] || continue
      marker="$ASSETS/.unpacked-$(basename "$bundle")"
      [ -f "$marker" ] && continue
      tmp=$(mktemp -d) && ln -s "$(realpath "$bundle")" "$tmp/"
      "$PY" scripts/device_data.py unpack --from "$tmp" --into "$ASSETS" && touch "$marker" || exit 1
      rm -rf "$tmp"
    done
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    ;;
  start)
    shift
    for job in "$@"; do
      command=$(job_command "$job") || { echo "unknown job $job" >&2; exit 2; }
      mkdir -p "$WORK/$job"
      echo "$command" >"$WORK/$job/command"
      # setsid: a process session of its own runs on after this call returns (the machine stays while warm).
      setsid bash -c "start=\$(date +%s); $command; echo \$? >$WORK/$job/rc; \
echo \$(( \$(date +%s) - start )) >$WORK/$job/seconds" >"$WORK/$job/log" 2>&1 < /dev/null &
      echo "started $job: $command"
    done
    ;;
  wait|collect)
    if [ "$1" = wait ]; then
      deadline=$(( $(date +%s) + ${2:-540} ))
      while [ "$(date +%s)" -lt "$deadline" ]; do
        running=$(for d in "$WORK"/*/; do [ -f "$d/command" ] && [ ! -f "$d/rc" ] && basename "$d"; done)
        [ -z "$running" ] && break
        sleep 10
      done
    fi
    out="${OUT:-$WORK/out}"
    mkdir -p "$out"
    for d in "$WORK"/*/; do
      job=$(basename "$d")
      [ -f "$d/command" ] || continue
      if [ -f "$d/rc" ]; then state="ended rc=$(cat "$d/rc") after $(cat "$d/seconds") s"; else state="still running"; fi
      echo "== $job: $state"
      tail -n 25 "$d/log"
      # A run still going (or killed) has its curve only in its checkpoints: keep the newest one's history.
      "$PY" - "$d" <<'EOF'
import json, sys, torch
from pathlib import Path
for ckdir in Path(sys.argv[1]).glob("runs/*/checkpoints"):
    newest = max(ckdir.glob("*.pt"), key=lambda p: p.stat().st_mtime, default=None)
    if newest is not None:
        history = torch.load(newest, map_location="cpu", weights_only=True)["history"]
        (ckdir.parent / "partial_history.json").write_text(json.dumps({"checkpoint": newest.name, "history": history}))
EOF
      # $OUT takes 8 files of 16 MiB, 64 MiB in all: one archive per job, without what the CPU side does not need
      # (per-epoch checkpoints, the fake-quant model, the PTQ graph: EfficientNet-Lite0's are 19 MB each); the
      # metrics, per-image records, curves, pruned_model.pt and the ONNX graphs to time stay. Split past 15 MiB.
      tar -czf "$out/$job.tar.gz" -C "$WORK" --exclude='checkpoints' --exclude='qat_model.pt' \
        --exclude='model_ptq.onnx' --exclude='*.engine' "$job" 2>/dev/null
      if [ "$(stat -c %s "$out/$job.tar.gz")" -gt $((15 * 2**20)) ]; then
        split -b 15m "$out/$job.tar.gz" "$out/$job.tar.gz.part-" && rm "$out/$job.tar.gz"
      fi
    done
    ls -la "$out"
    ;;
  *)
    sed -n '2,12p' "$0"; exit 2 ;;
esac
