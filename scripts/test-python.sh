#!/usr/bin/env bash
# Prints the path of a Python for the tests that talk to real peers written in Python: the grpcio
# client generated from proto/ (tests/cluster.rs), the moto S3 server and pylance
# (crates/distillery-cache/tests). The venv is cached outside the clone and made once; when PyPI
# cannot be reached, the tests that need it say SKIPPED.
set -euo pipefail
venv="${DISTILLERY_TEST_VENV:-$HOME/.cache/distillery/test-venv}"
stamp="$venv/.distillery-test-deps-1"
if [ ! -f "$stamp" ]; then
  python3 -m venv "$venv" >&2
  if "$venv/bin/pip" install -q --disable-pip-version-check \
      "grpcio==1.85.3" "grpcio-tools==1.85.1" "moto[server]==5.2.5" "pylance==14.0.2" >&2; then
    touch "$stamp"
  else
    echo "test-python: could not install the Python test peers; their tests will be skipped" >&2
  fi
fi
echo "$venv/bin/python"
