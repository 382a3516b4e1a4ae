#!/usr/bin/env bash
# The GPU check, in one call on the GPU machine: run it whenever training, calibration or device handling changes.
#   bash scripts/test_gpu.sh [--wheels DIR] [--out DIR] [--dry-run] [--skip-tests]
# 1. installs the wheels the machine lacks from DIR (default ./.carry/whl, made by scripts/device_wheels.sh) into
#    /tmp/site with --no-index --no-deps (never a torch wheel: the machine's CUDA build stays);
# 2. prints the GPU, torch and its CUDA, and checks that the workbench and its dependencies import;
# 3. runs every `cuda`-marked test (pytest -m cuda): on the GPU a test that skips because it needs CUDA fails;
# 4. runs a short recipe with `device: cuda` through the CLI: ResNet-20 (random weights) on generated images,
#    prune -> finetune -> calibrate -> qat -> export -> evaluate, two loader worker processes, and checks it;
# and prints one PASS/FAIL line per step (exit 1 when any failed). The log and the run's metrics.json go to --out
# ($OUT on the device machine, so they come back).
# --dry-run: the same steps on the CPU of a machine without a GPU (WORKBENCH_TEST_DEVICE=cpu, device: cpu). It checks
# the script and the tests themselves; it proves nothing about CUDA. --skip-tests leaves out step 3.
set -uo pipefail
WHEELS="$PWD/.carry/whl"  # where the caller stands: a copy of this repo may itself sit under .carry/
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-/tmp/gpu_check}"
DEVICE=cuda
SKIP_TESTS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --dry-run) DEVICE=cpu; shift ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    *) echo "usage: bash scripts/test_gpu.sh [--wheels DIR] [--out DIR] [--dry-run] [--skip-tests]" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p "$OUT_DIR"
export WORKBENCH_NO_PROGRESS=1 PYTHONUNBUFFERED=1 WORKBENCH_TEST_DEVICE="$DEVICE"
declare -a RESULTS=()
FAILED=0
record() {  # record NAME STATUS(0 = pass) [DETAIL]
  if [ "$2" = 0 ]; then RESULTS+=("PASS  $1${3:+  ($3)}"); else RESULTS+=("FAIL  $1${3:+  ($3)}"); FAILED=1; fi
  echo "== ${RESULTS[-1]}"
}

# 1. Wheels.
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  if ls "$WHEELS"/torch-[0-9]*.whl >/dev/null 2>&1; then
    record "wheels" 1 "$WHEELS holds a torch wheel: remove it, the machine's CUDA torch must stay"
  else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS"/*.whl >"$OUT_DIR/pip.log" 2>&1
    status=$?  # before any command substitution below resets $?
    record "wheels: $(ls "$WHEELS"/*.whl | wc -l) installed into /tmp/site" "$status" "log: pip.log"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

# 2. The machine and the imports.
"$PY" - "$DEVICE" <<'EOF' 2>&1 | tee "$OUT_DIR/machine.txt"
import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"{torch.cuda.device_count()} device(s)")
elif sys.argv[1] == "cuda":
    sys.exit("no CUDA device visible to torch")
EOF
record "a CUDA device is visible to torch (or --dry-run)" "${PIPESTATUS[0]}"
"$PY" -c "import workbench.api, modelopt.torch.quantization, torch_pruning, onnxslim, onnxruntime, pydantic, \
pycocotools; print('imports ok')" >"$OUT_DIR/imports.log" 2>&1
record "imports: workbench, modelopt, torch_pruning, onnxslim, onnxruntime, pydantic, pycocotools" $? \
  "$(tail -1 "$OUT_DIR/imports.log")"

# 3. Every cuda-marked test.
if [ "$SKIP_TESTS" = 0 ]; then
  mapfile -t FILES < <(grep -l "pytest.mark.cuda" tests/test_*.py)
  "$PY" -m pytest -m cuda -rA -q -p no:cacheprovider "${FILES[@]}" 2>&1 | tee "$OUT_DIR/cuda_tests.log"
  status=${PIPESTATUS[0]}
  counts=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)" "$OUT_DIR/cuda_tests.log" | tail -1)
  record "pytest -m cuda (${#FILES[@]} files)" "$status" "$counts"
  if [ "$DEVICE" = cuda ] && grep -E "^SKIPPED .*(CUDA|GPU)" "$OUT_DIR/cuda_tests.log"; then
    record "no cuda-marked test skipped for want of CUDA" 1 "see the SKIPPED lines above"
  fi
fi

# 4. A short recipe on the device, through the CLI.
WORK=$(mktemp -d)
"$PY" - "$WORK" "$DEVICE" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from helpers import make_image_folder
work, device = Path(sys.argv[1]), sys.argv[2]
images = make_image_folder(work / "images", classes=10, per_class=24, seed=3)
(work / "gpu_check.yaml").write_text(f"""name: gpu_check
task: classification
model: {{spec: "cifar_resnet:resnet20", input_size: [3, 32, 32]}}
device: {device}
data:
  transform: {{mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
  calibration: {{source: imagefolder, path: "{images}", count: 64, seed: 0}}
  # Random weights score at chance, where evaluate's label check refuses: score agreement with FP32 instead.
  evaluation: {{source: imagefolder, path: "{images}", labels: none}}
  finetune:
    source: imagefolder
    path: "{images}"
    transform: {{pad_crop: 4, hflip: true, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
  batch_size: 32
  workers: 2
runs_dir: "{work / 'runs'}"
stages:
  - prune: {{method: structured, ratio: 0.5, scope: layer}}
  - finetune: {{epochs: 3, lr: 0.05, eval_samples: 120}}
  - calibrate: {{method: mse}}
  - qat: {{epochs: 2, lr: 0.0001, eval_samples: 120}}
  - export: {{}}
  - evaluate: {{latency_batch_sizes: [1], latency_repeats: 5}}
""")
EOF
start=$(date +%s)
"$PY" -m workbench run "$WORK/gpu_check.yaml" >"$OUT_DIR/recipe.log" 2>&1
record "recipe with device: $DEVICE (prune -> finetune -> calibrate -> qat -> export -> evaluate)" $? \
  "$(( $(date +%s) - start )) s; log: recipe.log"
RUN_DIR=$(ls -d "$WORK"/runs/*/ 2>/dev/null | head -1)
mapfile -t CHECKS < <("$PY" - "${RUN_DIR:-none}" "$DEVICE" "$OUT_DIR" <<'EOF'
import json, math, shutil, sys
from pathlib import Path
run, device, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
if not (run / "metrics.json").is_file():
    print("1 recipe checks (no metrics.json)"); sys.exit()
shutil.copy(run / "metrics.json", out / "recipe_metrics.json")
m = json.loads((run / "metrics.json").read_text())
st, ev = m["stages"], m["stages"]["evaluate"]["backends"]
kl = {b: e["metrics"].get("mean_kl") for b, e in ev.items()}
ft, qat = st["finetune"]["history"], st["qat"]["history"]
checks = {
    f"the run's device is {m['device']}": m["device"].startswith(device),
    "every stage recorded": all(s in st for s in ("prune", "finetune", "calibrate", "qat", "export", "evaluate")),
    "prune kept at most half the parameters": st["prune"]["params_after"] <= 0.5 * st["prune"]["params_before"],
    "fine-tune loss falling, QAT loss finite": ft[-1]["loss"] < ft[0]["loss"] and math.isfinite(qat[-1]["loss"]),
    "ORT faithful INT8 = the GPU's fake-quant model (mean KL to FP32 within 1%)":
        abs(kl["ort_int8_faithful"] - kl["pytorch_int8"]) <= 0.01 * kl["pytorch_int8"] + 1e-4,
    "ORT FP32 = PyTorch FP32, pruned model (mean KL within 1e-4)":
        abs(kl["ort_fp32_pruned"] - kl["pytorch_fp32_pruned"]) <= 1e-4,
}
for what, ok in checks.items():
    print(f"{0 if ok else 1} recipe: {what}")
agreement = {b: e["metrics"].get("agreement_top1", float("nan")) for b, e in ev.items()}
print("0 recipe: agreement with FP32 % " + ", ".join(f"{b} {a:.1f}" for b, a in agreement.items()))
EOF
)
for line in "${CHECKS[@]}"; do record "${line#* }" "${line%% *}"; done
[ ${#CHECKS[@]} -gt 0 ] || record "recipe checks" 1 "the check itself failed"
for line in "${RESULTS[@]}"; do echo "$line"; done | tee "$OUT_DIR/summary.txt"
rm -rf "$WORK"
if [ "$FAILED" = 0 ]; then echo "GPU CHECK: PASS ($DEVICE)"; else echo "GPU CHECK: FAIL ($DEVICE)"; fi
exit "$FAILED"
