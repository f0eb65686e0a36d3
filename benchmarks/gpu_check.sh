#!/usr/bin/env bash
# GPU check for a machine with a CUDA device: the CUDA tests, then a short throughput benchmark
# (ours vs MONAI's sliding_window_inference, fp32 and --fp16), a table last. Installs nothing
# and needs no network; about 3-6 minutes, at most 8 (every step has its own time limit).
# Run from anywhere: bash benchmarks/gpu_check.sh [EXTRA bench_monai.py ARGS]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
status=0

echo "## machine"
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "(no nvidia-smi)"
python - <<'PY' || status=1
import onnxruntime as ort
import torch

print("torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
print("onnxruntime", ort.__version__, ort.get_available_providers())
if torch.cuda.is_available():
    print("card", torch.cuda.get_device_name(0))
PY

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device here: nothing to check"
    exit 1
fi

echo "## pytest -m gpu"
timeout 200 python -m pytest -q -m gpu -rs tests/ 2>&1 | tail -25
test "${PIPESTATUS[0]}" -eq 0 || status=1

echo "## CUDA throughput (ours vs MONAI, fp32 and fp16)"
if python -c "import monai" 2>/dev/null; then
    timeout 240 python benchmarks/bench_monai.py --cuda --repeats 3 \
        --json "$OUT/gpu_check.json" "$@" > "$OUT/bench_cuda.log" 2>&1 || status=1
    # The Markdown table is at the end of the log; the progress lines before it.
    sed -n '/^## CUDA throughput/,$p' "$OUT/bench_cuda.log"
    grep -q '^## CUDA throughput' "$OUT/bench_cuda.log" || tail -20 "$OUT/bench_cuda.log"
else
    echo "monai is not installed (benchmark-only dependency): throughput skipped"
    status=1
fi
echo "logs and JSON: $OUT"
exit $status
