# cmake -DCOMPILER=... -DFLAGS=... -DINCLUDES=... -DSOURCE=... -P check_prefetch.cmake
# Compiles SOURCE to assembly with FLAGS (the build's own, then -O3 -DNDEBUG) and fails unless
# both kinds of prefetch the scorer asks for are in it: prefetcht0 (the next runs, to L1) and
# prefetcht1 (the next tile, to L2).
separate_arguments(flags UNIX_COMMAND "${FLAGS}")
set(include_flags)
foreach(dir IN LISTS INCLUDES)
  list(APPEND include_flags "-I${dir}")
endforeach()
execute_process(
  COMMAND "${COMPILER}" -std=c++17 ${flags} -O3 -DNDEBUG ${include_flags} -S -o - "${SOURCE}"
  OUTPUT_VARIABLE assembly ERROR_VARIABLE errors RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "compiling ${SOURCE} failed:\n${errors}")
endif()
foreach(instruction IN ITEMS prefetcht0 prefetcht1)
  string(REGEX MATCHALL "${instruction}" found "${assembly}")
  list(LENGTH found count)
  message(STATUS "${instruction}: ${count} in the optimised decode")
  if(count EQUAL 0)
    message(FATAL_ERROR "no ${instruction} in the optimised dense scorer: the compiler dropped "
                        "the software prefetches (kernels/simd.hpp)")
  endif()
endforeach()
