#!/usr/bin/env bash
# Every GPU check of the project in one device call, most wanted first, each under its own time
# limit, and none started that could not end before the call's: the trials-per-GPU figures
# (benchmarks/gpu_suite.py), then the tests of the GPU-only paths (tests/test_gpu.py and the packing
# and training tests, which the CPU-only CI never runs where CUDA is).
#
# Here, once:  ../shared/gpu/prepare && bash benchmarks/gpu_session.sh --fetch
#              (--fetch adds pytest's wheels to .gpu/, which the GPU machine lacks)
# Device call: carry [".gpu"], command `. .gpu/install && bash benchmarks/gpu_session.sh`, timeout 600.
# Each step's log goes to $OUT (or ./gpu-logs), so what ran comes back even if the call is cut short.
# Options:    --fetch (above), -h/--help (this text). Exit status: 1 when a step failed (the last line of
#             session.log names the failed steps and those skipped for time) or there is no nvidia-smi here.
set -uo pipefail

case "${1:-}" in
  -h|--help)
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0 ;;
  --fetch)  # on this machine, no GPU needed
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d .gpu pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0
    ls .gpu/pytest-*.whl
    exit ;;
  "") ;;
  *)
    echo "gpu_session.sh: unknown argument '$1' (--fetch, --help, or none)" >&2
    exit 2 ;;
esac

if ! command -v nvidia-smi > /dev/null; then
  echo "gpu_session.sh: no nvidia-smi here, so no NVIDIA GPU to check: run it on the GPU machine (--fetch needs none)" >&2
  exit 1
fi

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
logs="${OUT:-$PWD/gpu-logs}"
mkdir -p "$logs"
deadline=${GPU_SESSION_SECONDS:-570}  # the device call's 600 s, less a margin to send the logs back

failed=() skipped=()  # the steps that exited non-zero, and those left out for time

step() {  # step NAME LIMIT_S COMMAND...: run it if LIMIT_S still fits before the deadline
  local name=$1 limit=$2 status
  shift 2
  if [ $((SECONDS + limit)) -gt "$deadline" ]; then
    echo "== $name: skipped, $((deadline - SECONDS)) s left of the session, it may take $limit" | tee -a "$logs/session.log"
    skipped+=("$name")
    return
  fi
  echo "== $name (at ${SECONDS} s, limit $limit s): $*" | tee -a "$logs/session.log"
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$logs/$name.log" 2>&1
  status=$?
  echo "== $name: exit $status after $SECONDS s" | tee -a "$logs/session.log"
  [ "$status" -eq 0 ] || failed+=("$name")
  tail -40 "$logs/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/session.log" || failed+=(nvidia-smi)
step study 200 python3 benchmarks/gpu_suite.py --parts capture,packing,study
step gpu-tests 120 python3 -m pytest -p no:xdist -p no:cacheprovider -o addopts="" -q -rs tests/test_gpu.py
step trial-vit 200 python3 benchmarks/gpu_suite.py --parts trial,vit
step designs 150 python3 benchmarks/gpu_suite.py --parts designs --layouts 1x8,8x1
step cpu-tests-on-gpu 150 python3 -m pytest -p no:xdist -p no:cacheprovider -o addopts="" -q -x -rs \
  tests/test_packing.py tests/test_train.py
echo "== session: $SECONDS s${failed[*]:+; failed: ${failed[*]}}${skipped[*]:+; skipped: ${skipped[*]}}" \
  | tee -a "$logs/session.log"
[ ${#failed[@]} -eq 0 ]
