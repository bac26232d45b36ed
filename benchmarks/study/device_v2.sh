#!/usr/bin/env bash
# Study v2 on one GPU (issue 19's device mode): N worker processes share the GPU (MiniLM is tiny: one run
# holds well under 2 GiB) and claim runs from the same plan as the CPU workers, in the same order.
#
#   bash benchmarks/study/device_v2.sh prepare   # here, with ../shared: the data files into benchmarks/study/.data-v2
#   run(command="bash benchmarks/study/device_v2.sh", carry=["benchmarks/study/.data-v2"], timeout_s=600)
#
# Writes $OUT/results_v2_gpu.jsonl (default benchmarks/results/device/); merge it into results_v2.jsonl
# (the keys do not depend on the device; each record names its device) and run report_v2.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
export ID3_STUDY_DATA="$PWD/benchmarks/study/.data-v2"
PY="${PYTHON:-python}"
if [ "${1:-}" = "prepare" ]; then
    exec "$PY" benchmarks/study/v2.py --prepare-data
fi
OUT="${OUT:-benchmarks/results/device}"
mkdir -p "$OUT"
if ! "$PY" -c "import selective_optimizers.wrap" 2>/dev/null; then
    timeout 60 "$PY" -m pip install -q --no-deps --target /tmp/so-site selective-optimizers==0.4 >/dev/null 2>&1 \
        || echo "official ID3 not installable here: its runs are recorded as errors" >&2
fi
WORKERS="${WORKERS:-14}"
MINUTES="${MINUTES:-8.5}"
"$PY" benchmarks/study/v2.py --device cuda --workers "$WORKERS" --threads 1 --max-minutes "$MINUTES" \
    --results "$OUT/results_v2_gpu.jsonl"
cp benchmarks/study/worker-v2-*.log "$OUT/" 2>/dev/null
"$PY" benchmarks/study/v2.py --dry-run --results "$OUT/results_v2_gpu.jsonl" >"$OUT/study_v2_progress.txt"
