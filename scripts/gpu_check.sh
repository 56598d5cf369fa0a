#!/usr/bin/env bash
# Issue 10, part 1, on a lent GPU machine, in ONE call of the `device` tool (a lease is 15 minutes in all,
# a machine's start 1-2 of them, one call at most 10). The machine is bare: Python 3.12 with torch, no
# network, none of pydantic, fvcore, iopath, yacs, termcolor, torch-pruning or torchao. So first, here:
#
#     make gpu-prep      # their wheels into .whl/ and the CIFAR-10 copy into data/ (both git-ignored, 25 MB)
#
# then:
#
#     run(command="bash scripts/gpu_check.sh", carry=[".whl", "data"], timeout_s=600)
#
# Steps, in order of value; each has a time limit, and a step with under 30 s left is skipped:
#   tests          tests/test_cuda.py but its compiled case: GPU vs CPU batches and evaluation, bf16
#                  training, every stage command with device: cuda, checkpoints, RNG restore, the
#                  throughput figure against CUDA events (limit 150 s)
#   bench          scripts/bench_train.py: images/s against the reference recipe, and the fp32 evaluation
#                  time of the 10,000 test images; the issue's targets (limit 75 s)
#   accuracy       scripts/bench_train.py --accuracy-epochs 30: both recipes 30 epochs, test top-1
#                  (limit 360 s; the reference recipe's 1.5 M images at ~6,000 images/s are most of it)
#   compiled       tests/test_cuda.py's compiled case: train, prune, quantize with train.compile (limit 150 s)
#   compile-bench  scripts/bench_train.py --compile (limit 90 s)
#   suite          the whole test suite with CUDA visible (not by default; every other test pins the CPU)
# Name steps to run only those: `bash scripts/gpu_check.sh compiled compile-bench`.
#
# The whole call ends within GPU_CHECK_SECONDS (default 560, for timeout_s=600). After every step the
# logs, JUnit XML and results/bench/*-gpu*.{json,md} so far are packed into $OUT/gpu-check.tgz, beside
# $OUT/summary.txt (each step's exit code and seconds), so a call cut short still brings back what
# finished. Here, unpack and keep the bench files, which carry their own provenance:
#     mkdir -p /tmp/gpu && tar xzf <files_at>/gpu-check.tgz -C /tmp/gpu && cp /tmp/gpu/results/bench/* results/bench/
set -uo pipefail
cd "$(dirname "$0")/.."
steps=("$@")
((${#steps[@]})) || steps=(tests bench accuracy compiled compile-bench)
for s in "${steps[@]}"; do
  case $s in tests | bench | accuracy | compiled | compile-bench | suite) ;;
    *) echo "unknown step '$s': give any of tests bench accuracy compiled compile-bench suite" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$PWD/gpu-out}
LIMIT=${GPU_CHECK_SECONDS:-560}
WORK=$(mktemp -d)
LOGS=$WORK/gpu-logs
mkdir -p "$OUT" "$LOGS" "$WORK/results/bench"
: >"$OUT/summary.txt"

say() { echo "$*" | tee -a "$OUT/summary.txt"; }
pack() { tar czf "$OUT/gpu-check.tgz" -C "$WORK" gpu-logs results; }

# step NAME SECONDS CMD...: CMD with at most SECONDS (or what is left of the call), logged to gpu-logs/NAME.log
step() {
  local name=$1 want=$2 left t t0 rc
  shift 2
  left=$((LIMIT - SECONDS - 10)) # 10 s for the last pack
  t=$((left < want ? left : want))
  if ((t < 30)); then
    say "$name: SKIPPED, $((LIMIT - SECONDS)) s left of $LIMIT"
    return
  fi
  t0=$SECONDS
  timeout -k 10 "$t" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  say "$name: exit $rc after $((SECONDS - t0)) s (limit $t s)$( ((rc == 124 || rc == 137)) && echo ', TIMED OUT')"
  tail -n 12 "$LOGS/$name.log"
  pack
}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    { say "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 RESCOMP_CACHE=$WORK/cache # one decoded CIFAR-10 cache for every step
{
  nvidia-smi
  nproc
  python3 -c "import sys, torch, torchvision; print(sys.version); print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA GPU')"
  python3 -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|triton|onnx|onnxruntime|onnxscript|pydantic|fvcore|torch-pruning|torchao|pytest|typer|rich|numpy|pillow) '
} >"$LOGS/env.txt" 2>&1
grep -E "NO CUDA GPU|^torch |NVIDIA H" "$LOGS/env.txt" | tee -a "$OUT/summary.txt"
python3 -c "import rescomp.cli" 2>>"$OUT/summary.txt" || { say "rescomp does not import: see above"; pack; exit 1; }

pytest=(python3 -m pytest -q -p no:cacheprovider -rs)
bench=(python3 scripts/bench_train.py --device cuda --out "$WORK/results/bench")
for s in "${steps[@]}"; do
  case $s in
    tests) step tests 150 "${pytest[@]}" --junitxml "$LOGS/tests.xml" tests/test_cuda.py -k "not compiled" ;;
    bench) step bench 75 "${bench[@]}" ;;
    accuracy) step accuracy 360 "${bench[@]}" --accuracy-epochs 30 ;;
    compiled) step compiled 150 "${pytest[@]}" --junitxml "$LOGS/compiled.xml" tests/test_cuda.py -k compiled ;;
    compile-bench) step compile-bench 90 "${bench[@]}" --compile ;;
    suite) step suite "$LIMIT" "${pytest[@]}" --junitxml "$LOGS/suite.xml" ;;
  esac
done
pack
say "done after $SECONDS s; $(tar tzf "$OUT/gpu-check.tgz" | grep -c -v '/$') files in gpu-check.tgz"
