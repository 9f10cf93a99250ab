#!/bin/sh
# Installs everything the tests need (Debian packages, a virtualenv) and runs the
# whole suite: lint, types, unit and end-to-end tests. Needs root: the tests create
# local users, PAM service files and sshd copies (never the host's own).
set -eu
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (sudo $0)" >&2; exit 1; }

packages="python3 python3-venv pamtester openssh-server openssh-client sshpass oathtool zbar-tools debootstrap systemd-container"
missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "test.sh: installing$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q $missing >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q $missing >/dev/null; }
fi

# The system Python: some tests run the CLI as an ordinary user, who must be able to run it.
python=$(command -v /usr/bin/python3 || command -v python3)
venv=${OTPGATE_TEST_VENV:-.venv-test}
if [ "$(readlink -f "$venv/bin/python" 2>/dev/null)" != "$(readlink -f "$python")" ]; then
  "$python" -m venv --clear "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip >/dev/null
"$venv/bin/pip" install -q -e '.[test]'

echo "test.sh: ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check --quiet .
echo "test.sh: mypy"
"$venv/bin/mypy"
echo "test.sh: pytest"
exec "$venv/bin/python" -m pytest "$@"
