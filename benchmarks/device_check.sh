#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): one run on one H100/H200-class GPU, under 8 minutes, writing JSON +
# Markdown under $OUT (default benchmarks/results/device/):
#   tests.txt / tests.xml      pytest --device cuda: the GPU-ready subset (tests that take the `device` fixture)
#   bench_device.json / .md    step time (full FT, LoRA, ID3, ID3 low-memory, official ID3) on MiniLM 32x128,
#                              SmolLM2-135M bf16 and a ~1.1B Llama; peak torch.cuda.max_memory_allocated per
#                              variant; one selection's time and extra memory at N = 100M .. 2B entries
#   device_check.json / .md    the summary of both, with the exit codes and the wall time
#
#   bash benchmarks/device_check.sh              # on the GPU machine
#   bash benchmarks/device_check.sh --dry-run    # on a CPU: tiny sizes, the same code paths (a test runs it)
#
# The official ID3 (selective-optimizers 0.4) is used when importable; otherwise one pip try
# (--no-deps, into /tmp/so-site), and the variant is skipped with a note if that fails (no network).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
OUT="${OUT:-benchmarks/results/device}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
start=$(date +%s)

if [ $DRY = 1 ]; then
    DEVICE=cpu
    BENCH_ARGS=(--dry-run --variants full,lora,id3,id3_low_memory,official --threads 1)
else
    DEVICE=cuda
    BENCH_ARGS=()
    if ! "$PY" -c "import selective_optimizers.wrap" 2>/dev/null; then
        if timeout 60 "$PY" -m pip install -q --no-deps --target /tmp/so-site selective-optimizers==0.4 >/dev/null 2>&1; then
            export PYTHONPATH="$PYTHONPATH:/tmp/so-site"
        else
            echo "official ID3: selective-optimizers not importable and not installable here; skipped" >&2
        fi
    fi
fi

# 1. The GPU-ready tests (on a CPU, --dry-run only lists them: the suite itself runs them there).
if [ $DRY = 1 ]; then
    "$PY" -m pytest --device cuda --collect-only -q -p no:cacheprovider tests >"$OUT/tests.txt" 2>&1
else
    timeout 240 "$PY" -m pytest --device cuda -q -p no:cacheprovider tests --junitxml="$OUT/tests.xml" \
        >"$OUT/tests.txt" 2>&1
fi
tests_rc=$?

# 2. Step time, peak memory, selection against N.
timeout 400 "$PY" benchmarks/bench_device.py --device "$DEVICE" --out "$OUT" "${BENCH_ARGS[@]}" \
    >"$OUT/bench_device.log" 2>&1
bench_rc=$?

# 3. The summary.
"$PY" - "$OUT" "$tests_rc" "$bench_rc" "$start" "$DRY" <<'EOF'
import json, os, sys, time
out, tests_rc, bench_rc, start, dry = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
tests = open(os.path.join(out, "tests.txt")).read().strip().splitlines()
bench_path = os.path.join(out, "bench_device.json")
bench = json.load(open(bench_path)) if os.path.exists(bench_path) else None
summary = {
    "dry_run": dry,
    "tests_exit_code": tests_rc,
    "tests_summary": tests[-1] if tests else "",
    "bench_exit_code": bench_rc,
    "bench_parts": sorted(k for k in ("step", "memory", "selection") if bench and k in bench),
    "seconds": time.time() - start,
    "machine": bench["machine"] if bench else None,
}
with open(os.path.join(out, "device_check.json"), "w") as f:
    json.dump(summary, f, indent=2)
lines = ["# Device check summary", ""]
lines += [f"- dry run: {dry}", f"- tests (pytest --device cuda{' --collect-only' if dry else ''}): exit {tests_rc}, `{summary['tests_summary']}`"]
lines += [f"- benchmarks: exit {bench_rc}, parts {', '.join(summary['bench_parts']) or 'none'}", f"- wall time: {summary['seconds']:.0f} s", ""]
if bench:
    lines.append(open(bench_path[:-5] + ".md").read())
with open(os.path.join(out, "device_check.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines[:6]))
sys.exit(0 if tests_rc == 0 and bench_rc == 0 else 1)
EOF
