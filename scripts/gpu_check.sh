#!/usr/bin/env bash
# The GPU checks of the open GPU issue, in one call of a lent machine: each named step runs under its own time
# limit, its output goes to one log, and bench/RESULTS.md (which the benches append to) is copied next to it.
#
#   scripts/gpu_check.sh [STEP ...]        e.g. scripts/gpu_check.sh tests verify kernels phase7
#
# Steps, in the order worth spending GPU minutes on (default: tests verify smoke kernels phase7):
#   tests    pytest -m gpu: every GPU-marked test (kernels at training sizes, compiled engine, FSDP at 1 GPU, hf)
#   verify   make verify-phase7: check-env, the attention kernel against its reference, a 3-step run
#   smoke    make train-phase7-1.5b-test: the 1.44B recipe for 20 steps on dummy data
#   kernels  make bench-kernels ARGS=--quick: attention and RMSNorm against SDPA / cuDNN / F.rms_norm
#   phase7   make bench-phase7-1.5b PEER=1 (no depth search): ours against HF Llama + torch.compile
#   levers   make bench-phase7-1.5b LEVERS=1: each optimisation alone
#   memory   make bench-phase7-1.5b MEM_GB=8: the 1.44B model in memory mode under an 8 GiB cap
#   hf       make bench-hf: phase hf against the plain loop + torch.compile
#   phase8   make bench-phase8-vs-phase7 MIXER=1: the linear-attention kernel at 32k, time per token 4k..128k
#   fsdp     make bench-fsdp: FSDP's overhead at world size 1
# OUT (the device tool's output folder; default ./gpu_check_out) receives gpu_check.log and RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
MAKE="make --no-print-directory PYTHON=${PYTHON:-python3}"

step() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$LOG"
    cp bench/RESULTS.md "$OUT/RESULTS.md"
}

for name in "${@:-tests verify smoke kernels phase7}"; do
    for s in $name; do
        case $s in
            tests) step tests 240 ${PYTHON:-python3} -m pytest -q -m gpu -p no:cacheprovider ;;
            verify) step verify 120 $MAKE verify-phase7 ;;
            smoke) step smoke 180 $MAKE train-phase7-1.5b-test ;;
            kernels) step kernels 240 $MAKE bench-kernels ARGS=--quick ;;
            phase7) step phase7 300 $MAKE bench-phase7-1.5b PEER=1 ARGS=--no-depth-search ;;
            levers) step levers 420 $MAKE bench-phase7-1.5b LEVERS=1 ;;
            memory) step memory 300 $MAKE bench-phase7-1.5b MEM_GB=8 ARGS=--no-depth-search ;;
            hf) step hf 300 $MAKE bench-hf ;;
            phase8) step phase8 300 $MAKE bench-phase8-vs-phase7 MIXER=1 ;;
            fsdp) step fsdp 300 $MAKE bench-fsdp ;;
            *) echo "unknown step '$s' (see the top of $0)" | tee -a "$LOG"; exit 2 ;;
        esac
    done
done
