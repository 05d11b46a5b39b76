#!/usr/bin/env bash
# The threaded tests under ThreadSanitizer: builds the `tsan` preset (g++, -fsanitize=thread
# -g -O1, tests only, and of them only driver_test, the executable that runs attention work and
# projections on ThreadPools) and runs its tests (every test name containing "Driver") with 2
# jobs. TSAN_OPTIONS (set by the test preset): halt_on_error=1, so the first report fails its
# test; no suppressions (a report in tpattn code is a race to fix, not to suppress).
#
# Two flags of the preset, both about the build, not about what TSan reports:
#  - -Wno-tsan: GCC warns (an error under the tests' -Werror) that TSan does not model
#    std::atomic_thread_fence. The only fences are Eigen's ThreadPool's, in EventCount::Notify
#    (the Dekker-style check of whether a worker must be woken) and RunQueue::SizeOrNotEmpty
#    (a snapshot of front_/back_ for the emptiness check). They order atomics only; every task
#    is handed over through RunQueue's per-slot atomic state (release on push, acquire on pop)
#    and completion through Eigen::Barrier (an atomic count, then a mutex and condition
#    variable), which TSan does model, so no happens-before edge that tpattn relies on is lost.
#  - -Wno-mismatched-new-delete: at -O1 GCC inlines tests/support/counting_new.hpp's replacement
#    operator delete (std::free) next to the replacement operator new (std::malloc) and takes
#    the pair for a mismatch. (g++ rather than clang++: clang links its TSan runtime statically,
#    with an operator new of its own that collides with counting_new.hpp's at link time.)
#
# Installs the Debian packages it needs when they are missing (g++ brings libtsan2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh

tpattn_install_deps cmake ninja-build g++ libeigen3-dev libgtest-dev libgmock-dev
tpattn_check_cmake

cmake --workflow --preset tsan
