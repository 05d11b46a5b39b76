#!/usr/bin/env bash
# The test suite under AddressSanitizer and UndefinedBehaviorSanitizer: builds the `asan` preset
# (-O1 -g1, -fsanitize=address,undefined -fno-sanitize-recover=all, so the first report fails
# the test; the tests only: the examples and the benchmark's smoke run are left to the release
# build) and runs every test with 2 jobs (the test preset sets ASAN_OPTIONS and UBSAN_OPTIONS:
# leaks detected, abort on the first error, and a refused allocation returns null, so operator
# new throws std::bad_alloc as without ASan and the tests of refused allocations run). CI runs
# it after ./scripts/test.sh.
# -Wno-mismatched-new-delete: at -O1 GCC inlines tests/support/counting_new.hpp's replacement
# operator delete (std::free) next to the replacement operator new (std::malloc) and takes the
# pair for a mismatch, as in the tsan preset (scripts/tsan.sh).
# Installs the Debian packages it needs when they are missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh

tpattn_install_deps cmake ninja-build g++ libeigen3-dev libgtest-dev libgmock-dev libbenchmark-dev
tpattn_check_cmake

cmake --workflow --preset asan
