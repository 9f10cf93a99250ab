#!/bin/sh
# Builds dist/otpgate_<version>_<arch>.deb: the daemon and CLI in their own
# virtualenv under /usr/lib/otpgate (built with the system Python), the hook
# (precompiled), the systemd unit, sysusers/tmpfiles entries, otpgated's PAM
# service, the SSH snippets (installed, not activated) and the man pages.
# Usage: packaging/deb/build.sh [OUTDIR]
set -eu
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$repo/dist}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml" | head -n 1)
arch=$(dpkg --print-architecture)
prefix=/usr/lib/otpgate
stage=$(mktemp -d /tmp/otpgate-deb-XXXXXX)
trap 'rm -rf "$stage"' EXIT
root=$stage/root

# Install from a clean copy: a stale build/ in the checkout would leak old modules.
tar -C "$repo" --exclude=./build --exclude=./dist --exclude='./.venv*' --exclude='*.egg-info' \
  --exclude=.git -cf - . | (mkdir "$stage/src" && tar -C "$stage/src" -xf -)
/usr/bin/python3 -m venv "$root$prefix"
"$root$prefix/bin/pip" install -q --no-compile "$stage/src"
"$root$prefix/bin/pip" uninstall -q -y pip setuptools >/dev/null 2>&1 || true
# The venv was built in the staging directory: make every path the installed one.
grep -rlI "$root" "$root" | xargs -r sed -i "s|$root||g"
find "$root$prefix" -name __pycache__ -prune -exec rm -rf {} +
rm -f "$root$prefix"/bin/activate* "$root$prefix"/bin/Activate.ps1
rm -f "$root$prefix"/lib/python3*/site-packages/otpgate-*.dist-info/direct_url.json

install -m 0755 "$repo/pam_hook/otpgate-pam-hook" "$root$prefix/otpgate-pam-hook"
install -m 0644 "$repo/pam_hook/otpgate_pam_hook.py" "$root$prefix/otpgate_pam_hook.py"
# Bytecode with the installed paths, so neither logins nor the daemon compile anything.
/usr/bin/python3 -m compileall -q -s "$root" -p / "$root$prefix/lib" "$root$prefix/otpgate_pam_hook.py"

install -d "$root/usr/bin" "$root/usr/sbin"
ln -s ../lib/otpgate/bin/otpgate "$root/usr/bin/otpgate"
ln -s ../lib/otpgate/bin/otpgated "$root/usr/sbin/otpgated"
install -D -m 0644 "$repo/packaging/systemd/otpgated.service" "$root/lib/systemd/system/otpgated.service"
install -D -m 0644 "$repo/packaging/systemd/otpgate.sysusers" "$root/usr/lib/sysusers.d/otpgate.conf"
install -D -m 0644 "$repo/packaging/systemd/otpgate.tmpfiles" "$root/usr/lib/tmpfiles.d/otpgate.conf"
install -D -m 0644 "$repo/packaging/pam.d/otpgate" "$root/etc/pam.d/otpgate"
install -d "$root/usr/share/otpgate/pam.d" "$root/usr/share/otpgate/sshd_config.d"
for f in "$repo"/packaging/pam.d/otpgate-ssh-*; do
  install -m 0644 "$(readlink -f "$f")" "$root/usr/share/otpgate/pam.d/$(basename "$f")"
done
for f in "$repo"/packaging/sshd_config.d/*.conf; do
  install -m 0644 "$(readlink -f "$f")" "$root/usr/share/otpgate/sshd_config.d/$(basename "$f")"
done
for page in "$repo"/packaging/man/*.[0-9]; do
  section=${page##*.}
  install -d "$root/usr/share/man/man$section"
  gzip -9n -c "$page" >"$root/usr/share/man/man$section/$(basename "$page").gz"
done
install -d "$root/usr/share/doc/otpgate"
gzip -9n -c "$repo/CHANGELOG.md" >"$root/usr/share/doc/otpgate/changelog.gz"
install -m 0644 "$repo/packaging/deb/copyright" "$root/usr/share/doc/otpgate/copyright"

install -d "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
  "$repo/packaging/deb/control" >"$root/DEBIAN/control"
echo /etc/pam.d/otpgate >"$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
  install -m 0755 "$repo/packaging/deb/$script" "$root/DEBIAN/$script"
done

mkdir -p "$out"
dpkg-deb --root-owner-group -Zxz --build "$root" "$out/otpgate_${version}_${arch}.deb" >/dev/null
echo "$out/otpgate_${version}_${arch}.deb"
