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

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v dtc >/dev/null 2>&1 || missing+=(device-tree-compiler)
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

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: khod needs Python 3.11 or newer ($python is $("$python" -V 2>&1))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".$extras" 2>&1 | grep -v "^WARNING: Location" >&2 || true
.venv/bin/python -c 'import khod, khod_client, libfdt, aiomqtt' || {
    echo "setup: the install did not complete (see pip's output above)" >&2
    exit 1
}
