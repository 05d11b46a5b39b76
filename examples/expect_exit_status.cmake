# Runs PROGRAM with ARGS (one string, split as a shell would) and fails unless it exits with
# status STATUS and prints MESSAGE: on stdout for status 0, on stderr otherwise. CTest's own
# WILL_FAIL would also pass a crash, and PASS_REGULAR_EXPRESSION ignores the status.
#   cmake -DPROGRAM=<path> -DARGS="--layers 3x" -DSTATUS=2 -DMESSAGE="--layers" -P <this file>
separate_arguments(arguments UNIX_COMMAND "${ARGS}")
execute_process(COMMAND "${PROGRAM}" ${arguments}
                RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT status STREQUAL "${STATUS}")
  message(FATAL_ERROR "${PROGRAM} ${ARGS}: expected exit status ${STATUS}, got '${status}'\n"
                      "stdout:\n${out}\nstderr:\n${err}")
endif()
if(STATUS STREQUAL "0")
  set(text "${out}")
else()
  set(text "${err}")
endif()
string(FIND "${text}" "${MESSAGE}" found)
if(found EQUAL -1)
  message(FATAL_ERROR "${PROGRAM} ${ARGS}: expected the output to contain '${MESSAGE}', got:\n"
                      "${text}")
endif()
