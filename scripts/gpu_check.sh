#!/usr/bin/env bash
# Issue 10, part 1, on a lent GPU machine: the CUDA tests, the throughput targets and the accuracy match,
# as two prepared calls of the `device` tool. The machine is bare (Python 3.12 with torch, no network, none
# of pydantic, fvcore, iopath, yacs, termcolor, torch-pruning, torchao), so first, here:
#
#     make gpu-prep      # their wheels into .whl/ and the CIFAR-10 copy into data/ (both git-ignored, 25 MB)
#
# then, one call right after the other (the machine stays warm for 30 s, so the second starts no machine):
#
#     run(command="bash scripts/gpu_check.sh check",    carry=[".whl", "data"], timeout_s=600)
#     run(command="bash scripts/gpu_check.sh accuracy", carry=[".whl", "data"], timeout_s=600)
#
#   check     tests/test_cuda.py (every stage with device: cuda, compiled and not; GPU vs CPU batches,
#             steps and evaluation; the throughput figure against CUDA events), then
#             scripts/bench_train.py (images/s against the reference recipe, evaluation time), then the
#             same with --compile if time is left. Planned: about 6 minutes on an H100.
#   accuracy  scripts/bench_train.py --accuracy-epochs 30: both recipes 30 epochs, test top-1.
#             Planned: about 6 minutes (the reference recipe at ~6,000 images/s is most of it).
#   suite     the whole test suite with CUDA visible (every other test pins device: cpu).
#
# Each step runs under its own time limit and the whole call ends within GPU_CHECK_SECONDS (540 s), so
# what finished always comes back: $OUT/summary.txt (each step's exit code and seconds) and
# $OUT/gpu-check-<mode>.tgz (logs, JUnit XML, results/bench/*-gpu*.{json,md}). Unpack that here with
#     tar xzf /work/.device/.../gpu-check-check.tgz      # -> results/bench/*-gpu*, gpu-logs/
# and commit the bench files as they came (they carry their own provenance).
set -uo pipefail
mode=${1:-check}
case $mode in check | accuracy | suite) ;; *) echo "usage: bash scripts/gpu_check.sh check|accuracy|suite" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
LIMIT=${GPU_CHECK_SECONDS:-540}
WORK=$(mktemp -d)
LOGS=$WORK/gpu-logs
mkdir -p "$OUT" "$LOGS" "$WORK/results/bench"
: > "$OUT/summary.txt"

say() { echo "$*" | tee -a "$OUT/summary.txt"; }

# step NAME SECONDS CMD...: CMD with at most SECONDS (or what is left of the call), logged to gpu-logs/NAME.log
step() {
  local name=$1 want=$2 left t t0 rc
  shift 2
  left=$((LIMIT - SECONDS))
  t=$((left < want ? left : want))
  if ((t < 30)); then
    say "$name: SKIPPED, ${left} s left of ${LIMIT}"
    return
  fi
  t0=$SECONDS
  timeout -k 10 "$t" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  say "$name: exit $rc after $((SECONDS - t0)) s (limit $t s)$( ((rc == 124 || rc == 137)) && echo ', TIMED OUT')"
  tail -n 15 "$LOGS/$name.log"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    { say "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 RESCOMP_CACHE=$WORK/cache
{
  nvidia-smi
  nproc
  python3 -c "import sys, torch, torchvision; print(sys.version); print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA GPU')"
  python3 -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|triton|onnx|onnxruntime|onnxscript|pydantic|fvcore|torch-pruning|torchao|pytest|typer|rich|numpy) '
} >"$LOGS/env.txt" 2>&1
grep -E "NO CUDA GPU|^torch " "$LOGS/env.txt" | tee -a "$OUT/summary.txt"
python3 -c "import rescomp.cli" 2>>"$OUT/summary.txt" || { say "rescomp does not import: see above"; exit 1; }

bench=(python3 scripts/bench_train.py --device cuda --out "$WORK/results/bench")
case $mode in
  check)
    step test_cuda 300 python3 -m pytest -q -p no:cacheprovider -rs --junitxml "$LOGS/test_cuda.xml" tests/test_cuda.py
    step bench 120 "${bench[@]}"
    step bench_compile 150 "${bench[@]}" --compile
    ;;
  accuracy)
    step accuracy 530 "${bench[@]}" --accuracy-epochs 30
    ;;
  suite)
    step suite 530 python3 -m pytest -q -p no:cacheprovider -rs --junitxml "$LOGS/suite.xml"
    ;;
esac

tar czf "$OUT/gpu-check-$mode.tgz" -C "$WORK" gpu-logs results
say "packed $(tar tzf "$OUT/gpu-check-$mode.tgz" | grep -c -v '/$') files into gpu-check-$mode.tgz after $SECONDS s"
