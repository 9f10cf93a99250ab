#!/bin/sh
# Installs everything the tests need (Debian packages, a virtualenv) and runs the
# whole suite: lint, types, unit and end-to-end tests. Needs root: the tests create
# local users, PAM service files, sshd copies (never the host's own) and a booted
# Debian container. Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."
packages="python3 python3-venv pamtester openssh-server openssh-client sshpass oathtool zbar-tools
  debootstrap systemd-container postgresql libpam-google-authenticator libpam-oath"
. scripts/env.sh
echo "test.sh: ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check --quiet .
echo "test.sh: mypy"
"$venv/bin/mypy"
echo "test.sh: pytest"
exec "$venv/bin/python" -m pytest "$@"
