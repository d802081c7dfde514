#!/usr/bin/env bash
# Idempotent host set-up for lazytrace on Debian 12 (bookworm) or 13 (trixie):
#   apt packages (QEMU 10 from bookworm-backports on Debian 12), the venv, the default guest kernel,
#   and the TCG plugin. Safe to run again: each step checks first and does nothing when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-unknown}")
pkgs=(gdb busybox-static cpio gcc make libc6-dev libglib2.0-dev pkg-config dpkg-dev file python3-venv xz-utils)
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1; }

missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
need_qemu=0
[ "$(qemu_major || true)" -ge 10 ] 2>/dev/null || need_qemu=1

if [ "$codename" = bookworm ]; then
    src=/etc/apt/sources.list.d/lazytrace-backports.list
    if ! grep -rqs '^deb .*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ \
        || ! grep -rqs '^deb-src .*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        say "adding bookworm-backports (QEMU 10) to apt's sources: $src"
        printf 'deb http://deb.debian.org/debian bookworm-backports main\ndeb-src http://deb.debian.org/debian bookworm-backports main\n' \
            | $SUDO tee "$src" >/dev/null
        need_update=1
    fi
fi
if [ ${#missing[@]} -gt 0 ] || [ $need_qemu -eq 1 ] || [ -n "${need_update:-}" ]; then
    say "apt-get update"
    $SUDO apt-get update -q
fi
if [ $need_qemu -eq 1 ]; then
    if [ "$codename" = bookworm ]; then
        say "installing QEMU 10 from bookworm-backports"
        $SUDO apt-get install -y -q -t bookworm-backports qemu-system-x86
    else
        $SUDO apt-get install -y -q qemu-system-x86
    fi
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    $SUDO apt-get install -y -q "${missing[@]}"
fi
say "$(qemu-system-x86_64 --version | head -1); $(gdb --version | head -1)"
[ "$(qemu_major)" -ge 10 ] || say "WARNING: QEMU $(qemu_major) cannot run the TCG plugin recorder (needs 10): gdb backend only"

# The venv (re-installed when pyproject.toml changes).
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    python3 -m venv .venv
fi
stamp=.venv/.lazytrace-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing lazytrace and its dependencies into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi

# The default guest kernel (download + unpack + verify; a no-op when cached).
say "guest kernel ${LAZYTRACE_KERNEL:-debian-cloud}"
.venv/bin/lazytrace kernels fetch "${LAZYTRACE_KERNEL:-debian-cloud}"

# The TCG plugin (built against this QEMU's plugin header), if the plugin recorder is present.
if [ -f tracer/plugin_build.py ]; then
    .venv/bin/python -m tracer.plugin_build || say "WARNING: TCG plugin not built: gdb backend only"
fi
say "ready"
