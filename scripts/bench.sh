#!/usr/bin/env bash
# The main job: builds the `bench` preset (-O3 -march=native, benchmarks only) and runs the
# benchmarks named in TPATTN_BENCHES (default: attention_bench), skipping with
# a message those not written yet; fails if none of them ran. Extra arguments go to each
# benchmark, e.g. ./scripts/bench.sh --benchmark_filter=TPA
# Installs the Debian packages it needs when they are missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh

tpattn_install_deps cmake ninja-build g++ libeigen3-dev libbenchmark-dev
tpattn_check_cmake

cmake --preset bench
cmake --build --preset bench

ran=0
for name in ${TPATTN_BENCHES:-attention_bench}; do
  exe="build/bench/bench/$name"
  if [[ -x "$exe" ]]; then
    echo "== $name"
    "$exe" "$@"
    ran=$((ran + 1))
  else
    echo "tpattn: skipping benchmark '$name': not built (bench/$name.cpp does not exist yet)" >&2
  fi
done
if [[ $ran -eq 0 ]]; then
  echo "tpattn: no benchmark ran" >&2
  exit 1
fi
