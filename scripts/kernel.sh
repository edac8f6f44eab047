#!/usr/bin/env bash
# The kernel harness: a small Linux with KHO + LUO, built once per machine and
# cached outside the checkout, booted under QEMU (virtme-ng) on the host's own
# filesystem so the guest runs this checkout's .venv, mosquitto and khod.
#
# Usage:
#   scripts/kernel.sh deps       install what is missing (Debian packages, virtme-ng)
#   scripts/kernel.sh source     fetch and unpack linux-source only (cached)
#   scripts/kernel.sh build      fetch linux-source and build the kernel (cached)
#   scripts/kernel.sh path       print the cached bzImage (builds it if needed)
#   scripts/kernel.sh run [VNG OPTS] -- CMD..  boot the guest (liveupdate=on) and run CMD
#   scripts/kernel.sh test [pytest args]   the pytest tests marked `kernel`
#
# Environment:
#   KHOD_KERNEL_CACHE   cache directory (default ${XDG_CACHE_HOME:-~/.cache}/khod-kernel)
#   KHOD_KERNEL_SOURCE  Debian source package (default linux-source-7.3)
#   KHOD_KERNEL_SUITE   Debian suite that has it (default trixie-backports)
#   KHOD_KERNEL_JOBS    make -j (default: number of cores, at most 3)
set -euo pipefail
# A failure inside $(...) stops the script too (fetch, unpack, build).
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
repo=$(pwd)

cache=${KHOD_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/khod-kernel}
source_pkg=${KHOD_KERNEL_SOURCE:-linux-source-7.3}
suite=${KHOD_KERNEL_SUITE:-trixie-backports}
jobs=${KHOD_KERNEL_JOBS:-$(($(nproc) < 3 ? $(nproc) : 3))}
fragment="$repo/scripts/kernel.config"
tools="$cache/tools"
# Bump when the build steps below change what comes out (part of the cache key).
recipe="tinyconfig+fragment v1"

log() { echo "kernel.sh: $*" >&2; }
die() {
    log "$*"
    exit 1
}

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

# Debian packages the build and the guest need, installed only when missing.
deps() {
    local missing=() pkg
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v kexec >/dev/null || [ -x /usr/sbin/kexec ] || missing+=(kexec-tools)
    for pkg in flex bison bc make gcc cpio xz-utils; do
        command -v "${pkg%-utils}" >/dev/null || missing+=("$pkg")
    done
    for pkg in libelf-dev libssl-dev; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' ||
            missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
    # virtme-ng in its own venv: it is a tool of the harness, not a khod dependency.
    if [ ! -x "$tools/bin/vng" ]; then
        log "installing virtme-ng into $tools"
        mkdir -p "$cache"
        python3 -m venv "$tools"
        # pip is chatty: its output only if it fails.
        "$tools/bin/python" -m pip install -q --upgrade pip virtme-ng >"$cache/pip.log" 2>&1 || {
            cat "$cache/pip.log" >&2
            die "installing virtme-ng failed"
        }
    fi
}

# The archive URI this machine's apt already uses, read from its sources: the
# repository names no host.
debian_uri() {
    local uri
    uri=$(grep -rhoE '^URIs:[[:space:]]*[^[:space:]]+/debian/?$' /etc/apt/sources.list.d/ 2>/dev/null |
        head -n1 | awk '{print $2}')
    if [ -z "$uri" ]; then
        uri=$(grep -rhoE '^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]+/debian/?[[:space:]]' \
            /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
            head -n1 | awk '{print $NF}')
    fi
    [ -n "$uri" ] || die "cannot find the Debian archive URI in /etc/apt/sources*"
    echo "${uri%/}"
}

# linux-source-X.Y from a private apt state: the system's sources and lists
# are left as they are.
fetch_source() {
    local apt="$cache/apt" deb
    deb=$(ls "$apt"/archives/"${source_pkg}"_*.deb 2>/dev/null | tail -n1 || true)
    if [ -z "$deb" ]; then
        mkdir -p "$apt/lists/partial" "$apt/archives"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(debian_uri) $suite main" \
            >"$apt/sources.list"
        local opts=(-o "Dir::Etc::sourcelist=$apt/sources.list" -o "Dir::Etc::sourceparts=-"
            -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
            -o "APT::Get::List-Cleanup=0")
        # The private directories belong to whoever runs this, not to _apt.
        [ "$(id -u)" -ne 0 ] || opts+=(-o "APT::Sandbox::User=root")
        mkdir -p "$apt/cache"
        log "fetching $source_pkg from $suite"
        # Quiet on stdout: this function's output is the path of the .deb.
        apt-get "${opts[@]}" update -qq >&2
        (cd "$apt/archives" && apt-get "${opts[@]}" -qq download "$source_pkg") >&2
        deb=$(ls "$apt"/archives/"${source_pkg}"_*.deb | tail -n1)
    fi
    echo "$deb"
}

# Unpacks the source tarball once per package version.
unpack_source() {
    local deb=$1 version dir tarball
    version=$(dpkg-deb -f "$deb" Version)
    dir="$cache/src/$source_pkg-$version"
    if [ ! -f "$dir/.unpacked" ]; then
        log "unpacking $source_pkg $version"
        rm -rf "$dir" "$cache/src/deb"
        mkdir -p "$dir" "$cache/src/deb"
        dpkg-deb -x "$deb" "$cache/src/deb"
        tarball=$(ls "$cache"/src/deb/usr/src/linux-source-*.tar.* | head -n1)
        tar -xaf "$tarball" -C "$dir" --strip-components=1
        rm -rf "$cache/src/deb"
        touch "$dir/.unpacked"
    fi
    echo "$dir"
}

# Builds bzImage once per (source version, config fragment, build recipe);
# prints its path.
build() {
    # Two runs on one machine (two checkouts, CI beside a developer) install,
    # fetch and build once: the second waits, then finds the cache. The lock
    # is let go before returning, so that nothing started later inherits it.
    mkdir -p "$cache"
    exec 9>"$cache/build.lock"
    flock 9
    # Plain calls, not `a && b`: set -e must stay in force inside them (a
    # failure exits the script, which lets go of the lock too).
    deps
    build_locked
    exec 9>&-
}

build_locked() {
    local deb version src key out
    deb=$(fetch_source)
    version=$(dpkg-deb -f "$deb" Version)
    key=$({ echo "$recipe"; cat "$fragment"; } | sha256sum | cut -c1-12)
    out="$cache/$source_pkg-$version-$key"
    if [ -f "$out/bzImage" ]; then
        echo "$out/bzImage"
        return
    fi
    src=$(unpack_source "$deb")
    local obj="$cache/build/$source_pkg-$version-$key"
    mkdir -p "$obj"
    log "building $source_pkg $version (config $key) with -j$jobs, log in $obj/build.log"
    local started=$SECONDS
    {
        # The smallest config, plus only what the guest needs: the first run
        # on a fresh machine pays this build inside CI's budget.
        make -C "$src" O="$obj" tinyconfig
        "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$fragment"
        make -C "$src" O="$obj" olddefconfig
        make -C "$src" O="$obj" -j"$jobs" bzImage
    } >"$obj/build.log" 2>&1 || {
        tail -n 40 "$obj/build.log" >&2
        die "kernel build failed (log: $obj/build.log)"
    }
    check_config "$obj/.config"
    mkdir -p "$out"
    cp "$obj/arch/x86/boot/bzImage" "$out/bzImage.tmp"
    cp "$obj/.config" "$out/config"
    mv "$out/bzImage.tmp" "$out/bzImage"
    log "built in $((SECONDS - started)) s: $out/bzImage"
    echo "$out/bzImage"
}

# The options the scenario cannot do without must have survived olddefconfig.
check_config() {
    local opt bad=0
    for opt in KEXEC_FILE KEXEC_HANDOVER LIVEUPDATE LIVEUPDATE_MEMFD MEMFD_CREATE 9P_FS \
        VIRTIO_PCI NET_9P_VIRTIO UNIX INET; do
        grep -q "^CONFIG_$opt=y" "$1" || {
            log "CONFIG_$opt is not set in $1"
            bad=1
        }
    done
    [ "$bad" -eq 0 ] || die "the kernel config lacks what the scenario needs"
}

# Boots the guest on the host's filesystem (read-only, with throw-away
# overlays: only --rwdir directories are written through to the host).
run_guest() {
    local image
    image=$(build)
    # root=/dev/root: without CONFIG_BLOCK the kernel mounts the 9p root
    # (tag /dev/root) only when it is named.
    PATH="$tools/bin:$PATH" exec "$tools/bin/vng" --run "$image" --disable-kvm \
        --memory 1G --cpus 2 --append "liveupdate=on root=/dev/root" "$@"
}

main() {
    case "${1:-}" in
    deps) deps ;;
    source) unpack_source "$(fetch_source)" ;;
    build | path) build ;;
    run)
        shift
        run_guest "$@"
        ;;
    test)
        shift
        build >/dev/null
        scripts/setup.sh --test
        # -rP: the guest's timings (printed by the fixture) also when all pass.
        exec .venv/bin/pytest -q -rP -p no:cacheprovider -m kernel tests/kernel "$@"
        ;;
    *)
        sed -n '2,18p' "$0" >&2
        exit 2
        ;;
    esac
}

# One line: bash has read all of it before running it, so editing this file
# while it runs cannot make the running copy read on into the new text.
main "$@"; exit
