#!/usr/bin/env bash
# Install redeemd on a Debian / Raspberry Pi OS box from a checkout: exactly the steps
# of docs/operations.md, "Install a box". Run as root from the checkout:
#
#   sudo systemd/install.sh                   # /opt/redeemd, the unit, users, udev rules
#   systemd/install.sh --root /tmp/img        # the same files under /tmp/img, no systemd calls
#
# Options:
#   --prefix DIR   where the virtual environment and docs go (default /opt/redeemd)
#   --root DIR     install under DIR as if it were / (DESTDIR-style: for tests and images).
#                  Nothing outside DIR is touched: no systemctl, udevadm, systemd-sysusers
#                  or systemd-tmpfiles; the script prints what to run on the box instead.
#                  A virtual environment is not relocatable, so one built with --root runs
#                  from DIR (tests) or once DIR is the root (a chroot or image build).
#   --python PY    the Python 3.11+ that makes the virtual environment (default python3)
#   --extras LIST  optional dependencies, e.g. "drivers" for HID and camera scanners
#                  (needs libzbar-dev libxkbcommon-dev to build; docs/scanners.md)
#   --offline      no network: the virtual environment reuses the packages already
#                  installed for --python (a .pth file names its site-packages) and only
#                  this checkout is installed (pip --no-deps --no-index --no-build-isolation;
#                  --python needs pip and setuptools>=70.1). For CI, and for images whose
#                  Python already has the dependencies.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
ROOT=""
PREFIX=/opt/redeemd
PYTHON=python3
EXTRAS=""
OFFLINE=0

say() { printf 'install: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --python) PYTHON=${2:?--python needs a command}; shift 2 ;;
    --extras) EXTRAS=${2:?--extras needs a list}; shift 2 ;;
    --offline) OFFLINE=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path, got $PREFIX" ;; esac
if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT"
  ROOT=$(cd "$ROOT" && pwd)
elif [ "$(id -u)" != 0 ]; then
  die "run as root (sudo $0), or give --root DIR to install under DIR"
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
  die "$PYTHON is not Python 3.11 or newer: install python3 (Debian 12 has 3.11)"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
  die "$PYTHON has no venv module: run 'apt-get install python3-venv' and try again"

VENV=$ROOT$PREFIX/.venv
ETC=$ROOT/etc

# 1. The virtual environment with redeemd in it. The checkout is copied first so that
# pip's build does not write build/ and *.egg-info into it.
say "virtual environment $VENV"
if [ "$OFFLINE" = 1 ]; then
  # Without its own pip and setuptools, so that those of $PYTHON (which build this
  # checkout without a download) are the ones found.
  "$PYTHON" -m venv --without-pip "$VENV"
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/redeemd-offline.pth"
  PIP_ARGS=(--no-deps --no-index --no-build-isolation)
else
  "$PYTHON" -m venv "$VENV"
  PIP_ARGS=()
fi
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
for part in pyproject.toml README.md cards runtime drivers storage sync daemon backend; do
  cp -r "$SRC/$part" "$build/"
done
find "$build" -name __pycache__ -prune -exec rm -rf {} +
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_ARGS[@]}" \
  "$build${EXTRAS:+[$EXTRAS]}" || die "pip install failed: check network access to PyPI (or use --offline)"
mkdir -p "$ROOT/usr/local/bin"
ln -sfn "$PREFIX/.venv/bin/redeemd" "$ROOT/usr/local/bin/redeemd"

# 2. Documentation and the example config beside it (the unit's Documentation= link).
install -d -m 0755 "$ROOT$PREFIX/docs"
install -m 0644 "$SRC"/docs/*.md "$ROOT$PREFIX/docs/"
install -m 0644 "$SRC/config.example.toml" "$ROOT$PREFIX/config.example.toml"

# 3. The unit, the user and the directories (owners and modes: tmpfiles.d/redeemd.conf),
# the udev rules for scanners.
install -d -m 0755 "$ETC/systemd/system" "$ETC/sysusers.d" "$ETC/tmpfiles.d" "$ETC/udev/rules.d"
sed "s|/opt/redeemd|$PREFIX|g" "$SRC/systemd/redeemd.service" > "$ETC/systemd/system/redeemd.service"
chmod 0644 "$ETC/systemd/system/redeemd.service"
install -m 0644 "$SRC/systemd/sysusers.d/redeemd.conf" "$ETC/sysusers.d/redeemd.conf"
install -m 0644 "$SRC/systemd/tmpfiles.d/redeemd.conf" "$ETC/tmpfiles.d/redeemd.conf"
install -m 0644 "$SRC/systemd/60-redeemd-scanners.rules" "$ETC/udev/rules.d/60-redeemd-scanners.rules"

# 4. The config, only if there is none: an existing box keeps its own. Keys go in
# /etc/redeemd/keys (owners and modes: tmpfiles.d/redeemd.conf).
install -d -m 0750 "$ETC/redeemd" "$ETC/redeemd/keys"
if [ -e "$ETC/redeemd/config.toml" ]; then
  say "kept the existing $ETC/redeemd/config.toml"
else
  install -m 0640 "$SRC/config.example.toml" "$ETC/redeemd/config.toml"
  say "wrote $ETC/redeemd/config.toml from config.example.toml: edit [box] and [[scanner]]"
fi

# Upgrade: keys used to live in /var/lib/redeemd/keys, inside the directory the daemon
# owns, where it could move them aside and put its own in place. Move them to
# /etc/redeemd/keys and point the config there. Only plain files named like keys
# move, never a link: the daemon's user could have made one to a secret of root's.
OLD=$ROOT/var/lib/redeemd/keys
if [ -d "$OLD" ] && [ ! -L "$OLD" ]; then
  moved=""
  for f in "$OLD"/*.pub "$OLD"/code.key; do
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    name=$(basename "$f")
    if [ -e "$ETC/redeemd/keys/$name" ]; then
      say "kept $ETC/redeemd/keys/$name; the old $f is left for you to compare and delete"
      continue
    fi
    install -m 0640 "$f" "$ETC/redeemd/keys/$name" && rm -f "$f"
    moved="$moved $name"
  done
  if [ -n "$moved" ]; then
    say "moved$moved from /var/lib/redeemd/keys to /etc/redeemd/keys: the daemon could write the old place, so compare them with the backend's (sha256sum root.pub code.key)"
  fi
  rmdir "$OLD" 2>/dev/null || say "$OLD still holds files that are not keys (or links): look at them, then delete it"
fi
if [ -f "$ETC/redeemd/keys/root.pub" ] &&
  grep -Eq '(\{state_dir\}|/var/lib/redeemd)/keys/' "$ETC/redeemd/config.toml"; then
  sed -i.before-keys-move -E 's#(\{state_dir\}|/var/lib/redeemd)/keys/#/etc/redeemd/keys/#g' \
    "$ETC/redeemd/config.toml"
  say "[trust] in $ETC/redeemd/config.toml now names /etc/redeemd/keys (the old file: config.toml.before-keys-move)"
fi

APPLY="systemd-sysusers /etc/sysusers.d/redeemd.conf
  systemd-tmpfiles --create /etc/tmpfiles.d/redeemd.conf
  udevadm control --reload && udevadm trigger --subsystem-match=tty --subsystem-match=input --subsystem-match=video4linux
  systemctl daemon-reload && systemctl enable redeemd"
NEXT="edit /etc/redeemd/config.toml ([box] id, merchant, store; [[scanner]] from 'redeemd devices')
  copy root.pub and code.key from the backend to /etc/redeemd/keys/, then run
  systemd-tmpfiles --create /etc/tmpfiles.d/redeemd.conf   (their owner and mode)
  redeemd check-config && systemctl start redeemd
  redeemd doctor && redeemd status"

if [ -n "$ROOT" ]; then
  cat >&2 <<MSG
install: installed under $ROOT. On the box (as root), apply it:
  $APPLY
then:
  $NEXT
MSG
  exit 0
fi

# 5. Apply: users before directories (tmpfiles names the user), rules before the unit.
systemd-sysusers /etc/sysusers.d/redeemd.conf
systemd-tmpfiles --create /etc/tmpfiles.d/redeemd.conf
udevadm control --reload
udevadm trigger --subsystem-match=tty --subsystem-match=input --subsystem-match=video4linux
systemctl daemon-reload
systemctl enable redeemd
cat >&2 <<MSG
install: done; redeemd is enabled but not started. Next:
  $NEXT
MSG
