#!/usr/bin/env bash
# The main job: builds the `bench` preset (-O3 -march=native, benchmarks only), runs the
# benchmarks named in TPATTN_BENCHES (default: attention_bench) and prints their summary tables.
# Each run's full results (every repetition, every counter) go to build/bench/<name>.json.
#
#   ./scripts/bench.sh                      the default preset (about 6-10 minutes on 2 cores)
#   ./scripts/bench.sh --preset=full        every configuration, storage, length and batch
#   ./scripts/bench.sh --report [args...]   then regenerate docs/benchmarks.md and its plots
#                                           from that JSON (scripts/bench_report.py)
# Other arguments go to each benchmark (see `build/bench/bench/attention_bench --help`), e.g.
#   ./scripts/bench.sh --configs=paper-d128 --benchmark_filter=decode/
# Installs the Debian packages it needs when they are missing (python3-matplotlib only for
# --report).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh

report=0
args=()
for arg in "$@"; do
  if [[ "$arg" == "--report" ]]; then report=1; else args+=("$arg"); fi
done
user_out=0
for arg in "${args[@]}"; do
  [[ "$arg" == --benchmark_out=* ]] && user_out=1
done

packages=(cmake ninja-build g++ libeigen3-dev libbenchmark-dev)
[[ $report -eq 1 ]] && packages+=(python3 python3-matplotlib)
tpattn_install_deps "${packages[@]}"
tpattn_check_cmake

cmake --preset bench
cmake --build --preset bench

ran=0
for name in ${TPATTN_BENCHES:-attention_bench}; do
  exe="build/bench/bench/$name"
  if [[ ! -x "$exe" ]]; then
    echo "tpattn: skipping benchmark '$name': not built (bench/$name.cpp does not exist yet)" >&2
    continue
  fi
  json="build/bench/$name.json"
  out=()
  [[ $user_out -eq 0 ]] && out=(--benchmark_out="$json" --benchmark_out_format=json)
  echo "== $name"
  "$exe" "${args[@]}" "${out[@]}"
  ran=$((ran + 1))
  if [[ $user_out -eq 0 ]]; then
    echo "== $name: full results in $json"
    if [[ $report -eq 1 ]]; then
      # Debian's interpreter, which python3-matplotlib belongs to (a python3 earlier in PATH,
      # e.g. pyenv's, may lack it).
      python=/usr/bin/python3
      [[ -x "$python" ]] || python=python3
      "$python" scripts/bench_report.py "$json" --out-dir docs
    fi
  elif [[ $report -eq 1 ]]; then
    echo "tpattn: --report reads the JSON it writes itself; run scripts/bench_report.py on yours" >&2
  fi
done
if [[ $ran -eq 0 ]]; then
  echo "tpattn: no benchmark ran" >&2
  exit 1
fi
