#!/usr/bin/env bash
# The GPU checks of the open GPU issue in ONE call of a lent machine (15 minutes of device time in all, at most 10
# per command, machine start included): the default run ends within BUDGET_S (480 s) on a cold machine. Each step
# runs under its own limit, cut to what is left of the budget, and streams its output into its own file in OUT, so
# a kill loses only the step it hit; bench/RESULTS.md's new lines are copied to OUT after every step.
#
#   scripts/gpu_check.sh              the default steps, in the order worth spending GPU minutes on
#   scripts/gpu_check.sh --plan       print the steps with their limits and the total; run nothing
#   scripts/gpu_check.sh --dry-run    the default run with each command replaced by an echo (the CPU test of this)
#   scripts/gpu_check.sh STEP ...     only these steps (e.g. a re-run of the failed ones), same limits
#
# Default steps:
#   warm     compile every Triton config the steps below can pick, on all cores, into Triton's cache
#            (python -m kernels.aot_check --warm), and print what compiling cost
#   tests    pytest -m gpu, kernels first: per-test timeout (TEST_TIMEOUT_S) and one line per test in tests.txt
#            as it starts and ends, so a killed run still tells which tests passed, failed or hung
#   verify   make verify-phase7: check-env, bf16 attention against SDPA at training shapes, a 3-step run
#   kernels  make bench-kernels ARGS=--headline: attention (causal, D128, S 2k/4k) and RMSNorm against their peers
#   phase7   make bench-phase7-1.5b PEER=1, short: ours against HF Llama + torch.compile
#   memory   make bench-phase7-1.5b MEM_GB=8, short: the 1.44B model in memory mode under an 8 GiB cap
#   smoke    make train-phase7-1.5b-test: the 1.44B recipe for 20 steps on dummy data
# More steps, by name only (each alone needs most of a call): levers, hf, phase8, fsdp, full-kernels.
# OUT (the device tool's output folder; default ./gpu_check_out) receives <step>.txt and RESULTS.md: at most 8
# files, what the device tool brings back.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
BUDGET_S=${BUDGET_S:-480}
PY=${PYTHON:-python3}
MAKE="make --no-print-directory PYTHON=$PY"
SHORT_BENCH="--no-depth-search --warmup 2 --steps 5"
PYTEST_GPU="env TEST_TIMEOUT_S=45 TEST_RESULTS_FILE=\$OUT/tests.txt $PY -m pytest -v -m gpu -p no:cacheprovider"
GPU_TESTS="tests/test_kernels.py tests/test_linear_attention.py tests/test_gpu_engine.py tests/test_distributed.py \
tests/test_hf.py"  # kernels first
export PYTHONUNBUFFERED=1
# Triton: keep autotuning results on disk (a later step reuses an earlier one's choice instead of benchmarking
# again), and print each choice once: which config won on the device is a finding too
export TRITON_CACHE_AUTOTUNING=1 TRITON_PRINT_AUTOTUNING=1

# name|limit in seconds|command: the default steps, in order (their limits add up to at most BUDGET_S)
DEFAULT_STEPS=(
    "warm|60|$PY -m kernels.aot_check --warm"
    "tests|90|$PYTEST_GPU $GPU_TESTS"
    "verify|35|$MAKE verify-phase7"
    "kernels|60|$MAKE bench-kernels ARGS=--headline"
    "phase7|120|$MAKE bench-phase7-1.5b PEER=1 ARGS='$SHORT_BENCH'"
    "memory|50|$MAKE bench-phase7-1.5b MEM_GB=8 ARGS='$SHORT_BENCH'"
    "smoke|60|$MAKE train-phase7-1.5b-test"
)
EXTRA_STEPS=(
    "levers|420|$MAKE bench-phase7-1.5b LEVERS=1"
    "hf|300|$MAKE bench-hf"
    "phase8|300|$MAKE bench-phase8-vs-phase7 MIXER=1"
    "fsdp|300|$MAKE bench-fsdp"
    "full-kernels|400|$MAKE bench-kernels"
)

field() { local IFS='|'; read -r name limit command <<<"$1"; }

plan() {
    local total=0
    printf '%-8s %6s  %s\n' step limit command
    for s in "${DEFAULT_STEPS[@]}"; do
        field "$s"
        printf '%-8s %5ss  %s\n' "$name" "$limit" "$command"
        total=$((total + limit))
    done
    printf '%-8s %5ss  (budget %ss: one device command may run 600 s)\n' total "$total" "$BUDGET_S"
    ((total <= BUDGET_S)) || { echo "error: the default steps' limits exceed BUDGET_S" >&2; return 1; }
}

lookup() {  # sets name, limit, command for step $1
    for s in "${DEFAULT_STEPS[@]}" "${EXTRA_STEPS[@]}"; do
        field "$s"
        [[ $name == "$1" ]] && return 0
    done
    echo "unknown step '$1' (scripts/gpu_check.sh --plan lists the default steps; the others: levers hf phase8 fsdp" \
        "full-kernels)" >&2
    return 2
}

if [[ ${1:-} == --plan ]]; then plan; exit; fi
dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
if [[ ${1:-} == -* ]]; then echo "usage: $0 [--plan | STEP ...]" >&2; exit 2; fi
steps=("$@")
if ((${#steps[@]} == 0)); then
    for s in "${DEFAULT_STEPS[@]}"; do field "$s"; steps+=("$name"); done
fi
for s in "${steps[@]}"; do lookup "$s" >/dev/null || exit 2; done

mkdir -p "$OUT"
results_start=$(stat -c %s bench/RESULTS.md 2>/dev/null || echo 0)
summary=()
started=$SECONDS
for s in "${steps[@]}"; do
    lookup "$s"
    left=$((BUDGET_S - (SECONDS - started)))
    if ((left < 10)); then
        summary+=("$(printf '%-8s skipped: %ss of the %ss budget left' "$name" "$left" "$BUDGET_S")")
        continue
    fi
    ((limit > left)) && limit=$left
    ((dry_run)) && command="echo would run: ${command//\$/\\\$}"
    log="$OUT/$name.txt"
    echo "=== $name (limit ${limit}s): $command" | tee -a "$log"
    start=$SECONDS
    # streamed: PYTHONUNBUFFERED above, and tee -a appends each line as it comes
    OUT="$OUT" timeout --kill-after=5 "$limit" bash -c "$command" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) verdict=ok ;;
        124 | 137) verdict="TIMED OUT" ;;
        *) verdict="FAILED rc=$rc" ;;
    esac
    line=$(printf '%-8s %-10s %4ss of %ss' "$name" "$verdict" "$((SECONDS - start))" "$limit")
    echo "=== $line" | tee -a "$log"
    summary+=("$line")
    [[ -f bench/RESULTS.md ]] && tail -c +$((results_start + 1)) bench/RESULTS.md >"$OUT/RESULTS.md"
done
echo "=== gpu_check: $((SECONDS - started))s of ${BUDGET_S}s"
printf '%s\n' "${summary[@]}"
