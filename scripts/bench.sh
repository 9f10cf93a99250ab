#!/bin/sh
# Installs what the benchmarks need and runs them all: one table on stdout, the same
# as JSON in bench/results.json. Needs root (bench users, PAM service files).
# Extra arguments go to bench.run (--quick, --only SECTION...).
set -eu
cd "$(dirname "$0")/.."
packages="python3 python3-venv pamtester libpam-oath libpam-google-authenticator passwd postgresql"
. scripts/env.sh
exec "$venv/bin/python" -m bench.run "$@"
