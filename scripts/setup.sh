#!/usr/bin/env bash
# Set up everything khod needs on this machine, idempotently:
#   - mosquitto and device-tree-compiler (dtc, fdtdump) from the distribution,
#     installed only when missing;
#   - a virtualenv in .venv with khod, its SDK and (with --test) the test tools.
# Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

python=${PYTHON:-python3}

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v dtc >/dev/null 2>&1 || missing+=(device-tree-compiler)
# pylibfdt is built from source (with a swig that pip fetches): it needs a C
# compiler and the Python headers; Debian's python3 also needs its venv module.
command -v cc >/dev/null 2>&1 || missing+=(gcc)
"$python" -c 'import os, sysconfig; p = sysconfig.get_paths()["include"]
raise SystemExit(not os.path.exists(os.path.join(p, "Python.h")))' 2>/dev/null ||
    missing+=(python3-dev)
"$python" -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    if command -v apt-get >/dev/null 2>&1; then
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    else
        echo "setup: please install ${missing[*]} with your package manager" >&2
        exit 1
    fi
fi

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: khod needs Python 3.11 or newer ($python is $("$python" -V 2>&1))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# pip and the build backends are chatty; show what they said only if it failed.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { .venv/bin/python -m pip install -q --upgrade pip &&
       .venv/bin/python -m pip install -q -e ".$extras"; } >"$log" 2>&1 ||
   ! .venv/bin/python -c 'import khod, khod_client, libfdt, aiomqtt' 2>>"$log"; then
    cat "$log" >&2
    echo "setup: installing khod into .venv failed (pip's output above)" >&2
    exit 1
fi
