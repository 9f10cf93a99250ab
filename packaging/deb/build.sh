#!/bin/sh
# Builds OUTDIR/otpgate_<version>_<arch>.deb (default OUTDIR: dist/) with dpkg-deb:
#   /usr/lib/otpgate              a virtualenv of the system Python (/usr/bin/python3) with a
#                                 normal (non-editable) install of this checkout and its
#                                 dependencies, built in a staging directory and relocated
#   /usr/lib/otpgate/otpgate-pam-hook   the pam_exec hook (standard library only), with its
#                                 module precompiled beside it
#   /usr/bin/otpgate, /usr/sbin/otpgated, the systemd unit, sysusers/tmpfiles entries,
#   /etc/pam.d/otpgate (conffile), the SSH snippets under /usr/share/otpgate (installed,
#   not activated), man pages, copyright and changelog.
# Needs: dpkg-deb, /usr/bin/python3 with venv (python3-venv), and pip's index (network,
# or a local wheel mirror). Root is not needed: files are root-owned in the package.
# Prints the path of the package on its last line.
set -eu
umask 022
export LC_ALL=C

repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$repo/dist}
prefix=/usr/lib/otpgate
python=/usr/bin/python3

die() { echo "build.sh: $*" >&2; exit 1; }
need() { [ -e "$repo/$1" ] || die "missing $1 (not written yet?)"; }

for f in pyproject.toml CHANGELOG.md pam_hook/otpgate_pam_hook.py packaging/pam.d/otpgate \
  packaging/systemd/otpgated.service packaging/systemd/otpgate.sysusers \
  packaging/systemd/otpgate.tmpfiles packaging/deb/control packaging/deb/copyright \
  packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm; do
  need "$f"
done
[ -x "$python" ] || die "$python is missing"
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing"

# PEP 440 -> Debian: pre-releases sort before the release (0.2.0rc1 -> 0.2.0~rc1).
pyversion=$(sed -n 's/^version *= *"\(.*\)"$/\1/p' "$repo/pyproject.toml" | head -n 1)
[ -n "$pyversion" ] || die "no version in pyproject.toml"
version=$(echo "$pyversion" | sed -E -e 's/\.?(a|b|rc|dev)([0-9]*)/~\1\2/g' -e 's/\.?post([0-9]*)/+post\1/')
dpkg --validate-version "$version" 2>/dev/null || die "version $pyversion -> $version: not a Debian version"
arch=$(dpkg --print-architecture)

mkdir -p "$out"
out=$(cd "$out" && pwd)
stage=$(mktemp -d "${TMPDIR:-/tmp}/otpgate-deb-XXXXXX")
trap 'rm -rf "$stage"' EXIT
trap 'exit 130' INT TERM
root=$stage/root
venv=$root$prefix

# 1. The virtualenv, from a clean copy of the checkout (a stale build/ would leak old modules).
mkdir "$stage/src"
tar -C "$repo" --exclude=./build --exclude=./dist --exclude='./.venv*' --exclude='*.egg-info' \
  --exclude=.git --exclude=__pycache__ --exclude=.pytest_cache --exclude=.mypy_cache \
  --exclude=.ruff_cache -cf - . | tar -C "$stage/src" -xf -
"$python" -m venv "$venv" || die "python3 -m venv failed (is python3-venv installed?)"
# With the PostgreSQL driver, so that a fleet host needs nothing from outside the package.
"$venv/bin/python" -m pip install -q --no-compile --no-warn-script-location "$stage/src[postgres]"
"$venv/bin/python" -m pip uninstall -q -y pip setuptools >/dev/null
rm -f "$venv"/bin/activate* "$venv"/bin/Activate.ps1
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +

# 2. Relocate: the venv was built at $venv, it will run at $prefix.
"$python" -I - "$venv" "$root" <<'EOF'
import base64, csv, glob, hashlib, io, os, sys

venv, root = sys.argv[1], sys.argv[2]
changed = []
for path in glob.glob(os.path.join(venv, "bin", "*")):
    if os.path.islink(path) or not os.path.isfile(path):
        continue
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"#!") and venv.encode() in data.split(b"\n", 1)[0]:
        rest = data.split(b"\n", 1)[1]
        with open(path, "wb") as f:
            f.write(b"#!/usr/lib/otpgate/bin/python\n" + rest)
        changed.append(path)
cfg = os.path.join(venv, "pyvenv.cfg")
with open(cfg, encoding="utf-8") as f:
    text = f.read()
with open(cfg, "w", encoding="utf-8") as f:
    f.write(text.replace(root, ""))
# Keep each RECORD true: new hashes for rewritten scripts, no direct_url.json (it names
# the staging directory).
for record in glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "*.dist-info", "RECORD")):
    site = os.path.dirname(os.path.dirname(record))
    rows, dirty = [], False
    with open(record, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            target = os.path.normpath(os.path.join(site, row[0]))
            if row[0].endswith(".dist-info/direct_url.json"):
                os.unlink(target)
                dirty = True
                continue
            if target in changed:
                with open(target, "rb") as g:
                    blob = g.read()
                digest = base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).rstrip(b"=")
                row = [row[0], "sha256=" + digest.decode(), str(len(blob))]
                dirty = True
            rows.append(row)
    if dirty:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        with open(record, "w", encoding="utf-8") as f:
            f.write(buf.getvalue())
EOF

# 3. The hook: launcher + module, or (without a launcher) the module itself.
if [ -f "$repo/pam_hook/otpgate-pam-hook" ]; then
  install -m 0755 "$repo/pam_hook/otpgate-pam-hook" "$venv/otpgate-pam-hook"
  install -m 0644 "$repo/pam_hook/otpgate_pam_hook.py" "$venv/otpgate_pam_hook.py"
  # checked-hash: valid whatever mtimes the files get; hashing 24 kB costs microseconds.
  "$python" -I -m compileall -q --invalidation-mode checked-hash -s "$root" -p / \
    "$venv/otpgate_pam_hook.py"
else
  echo "build.sh: no pam_hook/otpgate-pam-hook launcher: installing the module as the hook" >&2
  install -m 0755 "$repo/pam_hook/otpgate_pam_hook.py" "$venv/otpgate-pam-hook"
fi

# 4. Bytecode for every module, with the installed paths in it (tracebacks, no rewrites
# at run time: the daemon's file system is read-only).
"$python" -I -m compileall -q -j 0 -s "$root" -p / "$venv/lib"

# 5. Everything else.
install -d "$root/usr/bin" "$root/usr/sbin"
ln -s ../lib/otpgate/bin/otpgate "$root/usr/bin/otpgate"
ln -s ../lib/otpgate/bin/otpgated "$root/usr/sbin/otpgated"
install -D -m 0644 "$repo/packaging/systemd/otpgated.service" "$root/lib/systemd/system/otpgated.service"
install -D -m 0644 "$repo/packaging/systemd/otpgate.sysusers" "$root/usr/lib/sysusers.d/otpgate.conf"
install -D -m 0644 "$repo/packaging/systemd/otpgate.tmpfiles" "$root/usr/lib/tmpfiles.d/otpgate.conf"
# A fleet host's drop-in (README, "A fleet"): an example, installed by the admin.
for dropin in fleet central edge; do
  install -D -m 0644 "$repo/packaging/systemd/otpgated-$dropin.conf" \
    "$root/usr/share/otpgate/systemd/otpgated-$dropin.conf"
done
install -D -m 0644 "$repo/packaging/pam.d/otpgate" "$root/etc/pam.d/otpgate"
install -d "$root/usr/share/otpgate/pam.d" "$root/usr/share/otpgate/sshd_config.d"
for f in "$repo"/packaging/pam.d/otpgate-ssh-* "$repo"/packaging/sshd_config.d/*.conf; do
  [ -e "$f" ] || die "broken snippet link $f"
  dir=$(basename "$(dirname "$f")")
  install -m 0644 "$(readlink -f "$f")" "$root/usr/share/otpgate/$dir/$(basename "$f")"
done
for page in "$repo"/packaging/man/*.[1-8]; do
  [ -f "$page" ] || continue
  section=${page##*.}
  install -d "$root/usr/share/man/man$section"
  gzip -9n -c "$page" >"$root/usr/share/man/man$section/$(basename "$page").gz"
done
install -d "$root/usr/share/doc/otpgate"
gzip -9n -c "$repo/CHANGELOG.md" >"$root/usr/share/doc/otpgate/changelog.gz"
install -m 0644 "$repo/packaging/deb/copyright" "$root/usr/share/doc/otpgate/copyright"
chmod -R u+rwX,go+rX,go-w "$root"

# Nothing may name the staging directory: not a file (text or binary), not a link.
left=$(grep -rlF "$stage" "$root" || true)
[ -z "$left" ] || die "staging path left in: $left"
left=$(find "$root" -type l -lname "*$stage*")
[ -z "$left" ] || die "staging path left in links: $left"

# 6. Control files. Shared libraries in the wheels (grpcio, cffi) need these at run time.
shlibs=
if command -v dpkg-shlibdeps >/dev/null; then
  mkdir -p "$stage/shl/debian"
  printf 'Source: otpgate\n\nPackage: otpgate\nArchitecture: any\n' >"$stage/shl/debian/control"
  # shellcheck disable=SC2046
  shlibs=$(cd "$stage/shl" && find "$root" -name '*.so*' -type f -exec dpkg-shlibdeps -O {} + \
    2>/dev/null | sed -n 's/^shlibs:Depends=//p')
fi
[ -n "$shlibs" ] || shlibs="libc6 (>= 2.34), libgcc-s1, libstdc++6"
install -d "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
  -e "s/@SHLIBS@/$shlibs/" "$repo/packaging/deb/control" >"$root/DEBIAN/control"
echo /etc/pam.d/otpgate >"$root/DEBIAN/conffiles"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -print0 | sed -z 's|^\./||' | sort -z |
  xargs -0 md5sum) >"$root/DEBIAN/md5sums"
for script in postinst prerm postrm; do
  install -m 0755 "$repo/packaging/deb/$script" "$root/DEBIAN/$script"
done
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"

deb=$out/otpgate_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
