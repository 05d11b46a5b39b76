# Warning flags for tpattn's own targets (tests, benchmarks, examples, header checks).
#
# These never reach users: tpattn::tpattn carries no compile options. Only targets built inside
# this project call tpattn_internal_target().

# The flags, for targets created by CMake itself (see the header verification in the top-level
# CMakeLists.txt), which cannot be passed to a function.
set(TPATTN_INTERNAL_WARNINGS -Wall -Wextra -Wpedantic -Werror)

function(tpattn_internal_target target)
  target_compile_options(${target} PRIVATE ${TPATTN_INTERNAL_WARNINGS})
endfunction()
