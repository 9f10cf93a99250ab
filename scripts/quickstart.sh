#!/bin/sh
# Installs otpgate into a virtualenv and runs otpgated on the embedded default
# (SQLite, local Unix sockets), so that `otpgate` works right after. Needs root.
# Re-running it upgrades the install and restarts the daemon; state and key stay.
#   quickstart.sh --stop        stop the daemon it started
#   quickstart.sh --uninstall   stop it and remove what it installed; keeps the
#                               state (/var/lib/otpgate) and the key (/etc/otpgate)
set -eu
cd "$(dirname "$0")/.."
repo=$(pwd)
prefix=${OTPGATE_PREFIX:-/opt/otpgate}
state_dir=/var/lib/otpgate
runtime_dir=/run/otpgate
log=/var/log/otpgated.log

[ "$(id -u)" = 0 ] || { echo "quickstart: run as root (sudo $0)" >&2; exit 1; }
pidfile=$runtime_dir/otpgated.pid
hook_dir=/usr/local/lib/otpgate
man_dir=/usr/local/share/man

stop_daemon() {
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "quickstart: stopping otpgated ($(cat "$pidfile"))"
    kill -TERM "$(cat "$pidfile")"
    while kill -0 "$(cat "$pidfile")" 2>/dev/null; do sleep 0.2; done
  fi
  rm -f "$pidfile"
}

case "${1:-}" in
  "") ;;
  --stop)
    stop_daemon
    exit 0 ;;
  --uninstall)
    # Never leave sshd calling a hook that is gone: that would refuse every login.
    # (otpgate's own snippets only matter while another file includes them.)
    users=$(grep -ls -e "otpgate-pam-hook" -e "@include otpgate-ssh-" /etc/pam.d/* 2>/dev/null |
      grep -v "^/etc/pam.d/otpgate-ssh-" || true)
    if [ -n "$users" ]; then
      echo "quickstart: still used by $users; run 'otpgate setup ssh --undo' first" >&2
      exit 1
    fi
    stop_daemon
    rm -rf "$prefix" "$hook_dir"
    rm -f /usr/local/bin/otpgate /usr/local/sbin/otpgated /etc/pam.d/otpgate /etc/pam.d/otpgate-ssh-*
    for page in otpgate.1 otpgated.toml.5 otpgated.8 otpgate-pam-hook.8; do
      rm -f "$man_dir/man${page##*.}/$page"
    done
    echo "quickstart: removed. Kept: $state_dir (the database), /etc/otpgate (the key),"
    echo "  $log and the otpgate-admin group; delete them yourself to start afresh."
    exit 0 ;;
  *)
    echo "usage: $0 [--stop | --uninstall]" >&2
    exit 2 ;;
esac

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  apt-get install -y -q python3 python3-venv >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q python3 python3-venv >/dev/null; }
fi

# The system Python: ordinary users must be able to run `otpgate` to enroll themselves.
python=$(command -v /usr/bin/python3 || command -v python3)
echo "quickstart: installing into $prefix"
if [ "$(readlink -f "$prefix/bin/python" 2>/dev/null)" != "$(readlink -f "$python")" ]; then
  "$python" -m venv --clear "$prefix"
fi
"$prefix/bin/pip" install -q --upgrade pip >/dev/null
# From a clean copy (a stale build/ in the checkout would leak old modules); same
# version number, newer code: reinstall the package itself every time.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -C "$repo" --exclude=./build --exclude=./dist --exclude='./.venv*' --exclude='*.egg-info' \
  --exclude=.git -cf - . | tar -C "$src" -xf -
# With the PostgreSQL driver: a fleet (README, "A fleet") needs nothing more.
"$prefix/bin/pip" install -q "$src[postgres]"
"$prefix/bin/pip" install -q --no-deps --force-reinstall "$src"
ln -sf "$prefix/bin/otpgate" /usr/local/bin/otpgate
ln -sf "$prefix/bin/otpgated" /usr/local/sbin/otpgated

# The hook runs under the system Python on every login: root-owned, not writable by others.
# Precompiled, so that logins do not pay for compiling it.
install -d -m 0755 "$hook_dir"
install -m 0755 -o root -g root "$repo/pam_hook/otpgate-pam-hook" "$hook_dir/otpgate-pam-hook"
install -m 0644 -o root -g root "$repo/pam_hook/otpgate_pam_hook.py" "$hook_dir/otpgate_pam_hook.py"
/usr/bin/python3 -I -m py_compile "$hook_dir/otpgate_pam_hook.py"
# Man pages where man looks for local ones (man-db indexes them when installed).
for page in "$repo"/packaging/man/*.[158]; do
  section=${page##*.}
  install -d -m 0755 "$man_dir/man$section"
  install -m 0644 "$page" "$man_dir/man$section/"
done
command -v mandb >/dev/null && mandb -q "$man_dir" >/dev/null 2>&1 || true
# otpgated's own PAM service, for password checks; sshd's files are not touched.
[ -e /etc/pam.d/otpgate ] || install -m 0644 "$repo/packaging/pam.d/otpgate" /etc/pam.d/otpgate
getent group otpgate-admin >/dev/null || groupadd --system otpgate-admin
install -d -m 0700 /etc/otpgate

stop_daemon
install -d -m 0755 "$runtime_dir"
# Running the quick start again is how it is upgraded: bring an older database to
# this version's schema (otpgated refuses it otherwise), after a backup beside it.
if [ -e "$state_dir/otpgate.sqlite3" ]; then
  if ! upgraded=$("$prefix/bin/otpgated" upgrade-schema --state-dir "$state_dir" 2>&1); then
    echo "quickstart: $upgraded" >&2
    exit 1
  fi
  echo "quickstart: $upgraded"
fi
setsid "$prefix/bin/otpgated" --state-dir "$state_dir" --runtime-dir "$runtime_dir" \
  </dev/null >>"$log" 2>&1 &
echo $! >"$pidfile"
i=0
until grep -q "otpgated\[$(cat "$pidfile")\] INFO started" "$log" 2>/dev/null; do
  i=$((i + 1))
  if [ $i -gt 150 ] || ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "quickstart: otpgated did not start; its log ($log) ends with:" >&2
    tail -n 5 "$log" >&2
    exit 1
  fi
  sleep 0.1
done
echo "quickstart: otpgated running (pid $(cat "$pidfile"), log $log)"
echo "quickstart: its key is /etc/otpgate/otpgate.key: back it up apart from $state_dir;"
echo "  without it no secret can be opened again."
otpgate config
cat <<EOT

Next: enroll an account and check a code
  otpgate renew-secret USER            # shows the URI and a QR code to scan
  otpgate verify USER CODE             # true once, then false for the same code
Admins: root, or members of the otpgate-admin group (usermod -aG otpgate-admin NAME).
Stop it: $0 --stop; remove it: $0 --uninstall. Manual: man otpgate.
EOT
