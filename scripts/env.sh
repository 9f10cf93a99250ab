# Sourced by test.sh and bench.sh: install missing Debian packages ($packages), then
# make the virtualenv ($venv, default .venv-test) with the package and its test tools.
# The system Python: some tests run the CLI as an ordinary user, who must be able to.
[ "$(id -u)" = 0 ] || { echo "$0: run as root" >&2; exit 1; }
missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "$0: installing$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q $missing >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q $missing >/dev/null; }
fi
python=$(command -v /usr/bin/python3 || command -v python3)
venv=${OTPGATE_TEST_VENV:-.venv-test}
if [ "$(readlink -f "$venv/bin/python" 2>/dev/null)" != "$(readlink -f "$python")" ]; then
  "$python" -m venv --clear "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip >/dev/null
"$venv/bin/pip" install -q -e '.[test]'
