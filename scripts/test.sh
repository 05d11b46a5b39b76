#!/usr/bin/env bash
# Builds tpattn with the `release` preset (-O3 -march=native) and runs every test with 2 jobs:
# unit tests, examples, header self-containment (part of the build) and the consumer projects
# (among them the warnings check, which also builds with clang++).
# Installs the Debian packages it needs when they are missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh

tpattn_install_deps cmake ninja-build g++ clang libeigen3-dev libgtest-dev libgmock-dev libbenchmark-dev
tpattn_check_cmake

cmake --workflow --preset release
