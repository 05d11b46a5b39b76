#!/usr/bin/env bash
# scripts/fuzz.sh [SECONDS] [FUZZER...] -- builds the libFuzzer targets (the `fuzz` preset:
# clang++, ASan + UBSan) and runs each fuzzer for SECONDS (default 60) on a copy of its seed
# corpus, one after the other (TPATTN_FUZZ_PARALLEL=1: all at once, one core each).
#
#   FUZZER      cache_fuzzer, operator_fuzzer (default: every tests/fuzz/*_fuzzer.cpp)
#   corpus      tests/fuzz/corpus/<name>/ is copied to build/fuzz/corpus-work/<name>/, where the
#               fuzzer adds what it finds, so the repository's seeds stay small; the work corpus
#               is kept between runs
#   crashes     written to build/fuzz/artifacts/<fuzzer>/ (crash-*, timeout-*, oom-*, leak-*);
#               every new one is printed, and the script exits 1
#   logs        build/fuzz/logs/<fuzzer>.log; the last status line (#runs DONE cov: ...) is printed
#
# Installs the Debian packages it needs when they are missing (libFuzzer's runtime and
# <fuzzer/FuzzedDataProvider.h> are in libclang-rt-14-dev on Debian 12). Extra libFuzzer flags
# can be passed in TPATTN_FUZZ_FLAGS (e.g. "-jobs=2 -workers=2" or "-dict=...").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh

seconds=${1:-60}
if [[ $# -gt 0 ]]; then shift; fi
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/fuzz.sh [SECONDS] [FUZZER...]   (SECONDS a positive integer, got '$seconds')" >&2
  exit 2
fi

tpattn_install_deps clang libclang-rt-14-dev cmake ninja-build libeigen3-dev
tpattn_check_cmake

cmake --preset fuzz
cmake --build --preset fuzz

build=build/fuzz
fuzzers=("$@")
if [[ ${#fuzzers[@]} -eq 0 ]]; then
  for source in tests/fuzz/*_fuzzer.cpp; do
    fuzzers+=("$(basename "$source" .cpp)")
  done
fi
for name in "${fuzzers[@]}"; do
  if [[ ! -x $build/tests/fuzz/$name ]]; then
    echo "tpattn: no fuzzer '$name' (have: $(cd tests/fuzz && ls -- *_fuzzer.cpp | sed 's/\.cpp$//' | tr '\n' ' '))" >&2
    exit 2
  fi
done

mkdir -p "$build/logs"
marker=$(mktemp)
trap 'rm -f "$marker"' EXIT

run_one() {
  local name=$1 corpus=${1%_fuzzer}
  local work=$build/corpus-work/$corpus artifacts=$build/artifacts/$name
  mkdir -p "$work" "$artifacts"
  if [[ -d tests/fuzz/corpus/$corpus ]]; then
    cp -n tests/fuzz/corpus/"$corpus"/* "$work"/ 2>/dev/null || true
  fi
  # -timeout: one input taking over 60 s is reported as a hang (timeout-*).
  # shellcheck disable=SC2086
  "$build/tests/fuzz/$name" -max_total_time="$seconds" -timeout=60 \
    -artifact_prefix="$artifacts/" ${TPATTN_FUZZ_FLAGS:-} "$work" >"$build/logs/$name.log" 2>&1
}

pids=()
status=0
for name in "${fuzzers[@]}"; do
  echo "tpattn: running $name for $seconds s (log: $build/logs/$name.log)"
  if [[ ${TPATTN_FUZZ_PARALLEL:-0} == 1 ]]; then
    run_one "$name" &
    pids+=($!)
  else
    run_one "$name" || status=1
  fi
done
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done

found=0
for name in "${fuzzers[@]}"; do
  summary=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$build/logs/$name.log" | tail -n 1 || true)
  echo "tpattn: $name: ${summary:-no DONE line, see the log}"
  while IFS= read -r artifact; do
    echo "tpattn: $name found a failure: $artifact"
    echo "        reproduce: $build/tests/fuzz/$name $artifact   (TPATTN_FUZZ_TRACE=1 prints the calls)"
    found=1
  done < <(find "$build/artifacts/$name" -type f -newer "$marker" | sort)
done

if [[ $found -ne 0 ]]; then
  exit 1
fi
if [[ $status -ne 0 ]]; then
  echo "tpattn: a fuzzer exited with an error but left no artifact; see the logs above" >&2
  exit 1
fi
echo "tpattn: no failures"
