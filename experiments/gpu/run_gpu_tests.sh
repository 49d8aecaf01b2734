#!/usr/bin/env bash
# The GPU tests in one device call: spread over TESTS_WORKERS processes (the Triton compiles are most of
# the time; one process needs ~22 minutes), then the failures once more over 2 processes, because 8
# processes sharing one 80 GB card run some 64K tests out of memory. A real failure fails both passes.
set -u
paths=${TESTS_PATHS:-tests}
workers=${TESTS_WORKERS:-8}
python -c 'import xdist' 2>/dev/null || { echo "pytest-xdist missing: one process"; workers=0; }
# shellcheck disable=SC2086
python -m pytest -m gpu $paths -q -rfE -n "$workers" ${TESTS_ARGS:-}
status=$?
[ $status -ne 1 ] && exit $status
echo "== rerunning the failures over 2 processes (out-of-memory is likely with $workers sharing the card)"
# shellcheck disable=SC2086
python -m pytest -m gpu $paths -q -rfE --last-failed --last-failed-no-failures none -n 2 ${TESTS_ARGS:-}
