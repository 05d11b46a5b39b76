# cmake -DCOMPILER=... -DFLAGS=... -DINCLUDES=... -DSOURCE=... -P check_prefetch.cmake
# Compiles SOURCE to assembly with FLAGS (the build's own, then -O3 -DNDEBUG) and fails unless
# the scorer's prefetches are in it: prefetcht1 (to L2: the runs a prefetch distance ahead, and
# the next tile of the column path).
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
foreach(instruction IN ITEMS prefetcht1)
  string(REGEX MATCHALL "${instruction}" found "${assembly}")
  list(LENGTH found count)
  message(STATUS "${instruction}: ${count} in the optimised decode")
  if(count EQUAL 0)
    message(FATAL_ERROR "no ${instruction} in the optimised dense scorer: the compiler dropped "
                        "the software prefetches (kernels/simd.hpp)")
  endif()
endforeach()
