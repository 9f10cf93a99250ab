#!/bin/sh
# Installs what the benchmarks need and runs them all: one table on stdout, the same
# as JSON in bench/results.json. Needs root (bench users, PAM service files).
# Extra arguments go to bench.run (--quick, --only SECTION...).
set -eu
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench.sh: run as root" >&2; exit 1; }
packages="python3 python3-venv pamtester libpam-oath libpam-google-authenticator passwd"
missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q $missing >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q $missing >/dev/null; }
fi
python=$(command -v /usr/bin/python3 || command -v python3)
venv=${OTPGATE_TEST_VENV:-.venv-test}
if [ "$(readlink -f "$venv/bin/python" 2>/dev/null)" != "$(readlink -f "$python")" ]; then
  "$python" -m venv --clear "$venv"
fi
"$venv/bin/pip" install -q -e '.[test]'
exec "$venv/bin/python" -m bench.run "$@"
