#!/usr/bin/env bash
# Builds the container image agora:latest from the top-level Dockerfile, with podman or docker.
#
#   bash scripts/image.sh [--local | --pull] [--tag NAME]
#
# --pull: the whole build inside the Dockerfile (agora compiled in the Rust image, nats-server from
#   the official nats image, Debian bookworm-slim underneath): what `docker build .` does.
# --local: for a machine that can pull no image (no registry, as on the test machines): agora is
#   built on this host with cargo, nats-server taken from PATH, and the runtime base made here with
#   debootstrap (Debian bookworm, minbase) and imported once as localhost/agora-base:bookworm; the
#   same Dockerfile then runs with BINARIES=prebuilt. The runtime stage is the same either way.
# Neither: --pull when the registry answers within 20 s, else --local.
#
# AGORA_IMAGE_BINARY=PATH (--local only): an agora binary already built from this checkout goes
# into the image instead of a fresh `cargo build --release` (the test suite hands in the one
# `cargo test --release` built: a plain build resolves the crates' features without the
# dev-dependencies, so it would compile agora and ~30 crates again).
# AGORA_CONTAINER_ENGINE=podman|docker picks the engine (default: podman if installed). With
# podman, builds and runs use --runtime runc where crun is refused by the machine's cgroups (set
# AGORA_CONTAINER_RUNTIME to override).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

mode=auto
tag=agora:latest
while [ $# -gt 0 ]; do
  case "$1" in
    --local) mode=local ;;
    --pull) mode=pull ;;
    --tag) tag="${2:?--tag needs a name}"; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "image.sh: unknown argument $1 (use --local, --pull or --tag NAME)" >&2; exit 2 ;;
  esac
  shift
done

need_container_engine
engine="$AGORA_CONTAINER_ENGINE"
build_flags=()
[ "$engine" = podman ] && build_flags+=(--format docker "${CONTAINER_RUNTIME_FLAGS[@]}")
commit="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"

if [ "$mode" = auto ]; then
  if timeout 20 "$engine" pull -q docker.io/library/debian:bookworm-slim >/dev/null 2>&1; then
    mode=pull
  else
    echo "==> no image can be pulled from docker.io: building with --local (binaries from this host)"
    mode=local
  fi
fi

if [ "$mode" = pull ]; then
  echo "==> $engine build -t $tag . (agora compiled inside the image build)"
  exec "$engine" build "${build_flags[@]}" --build-arg AGORA_COMMIT="$commit" -t "$tag" .
fi

# --local: the runtime base, made once.
base=localhost/agora-base:bookworm
if ! "$engine" image exists "$base" 2>/dev/null && ! "$engine" image inspect "$base" >/dev/null 2>&1; then
  need_debootstrap
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' EXIT
  echo "==> making the base image $base (debootstrap --variant=minbase bookworm, about a minute)"
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
  # What bookworm-slim leaves out too: package lists, caches, documentation.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/*
  tar -C "$root" -c . | "$engine" import - "$base" >/dev/null
  rm -rf "$root"
  trap - EXIT
fi

need_cargo
need_nats_server
binary="${AGORA_IMAGE_BINARY:-}"
if [ -z "$binary" ]; then
  echo "==> cargo build --release --bin agora"
  cargo build --release --quiet --bin agora
  binary=target/release/agora
elif [ ! -x "$binary" ]; then
  echo "image.sh: AGORA_IMAGE_BINARY=$binary is not an executable file; build it or unset the variable" >&2
  exit 2
else
  echo "==> the agora binary from $binary (AGORA_IMAGE_BINARY)"
fi
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
mkdir "$context/prebuilt"
cp Dockerfile "$context/"
objcopy --strip-debug "$binary" "$context/prebuilt/agora"
cp "$(command -v nats-server)" "$context/prebuilt/nats-server"
# pip's nats-server on PATH may be a shim script: the binary is what `nats-server` finally runs.
if ! head -c 4 "$context/prebuilt/nats-server" | grep -q ELF; then
  real="$(python3 -c 'import sysconfig, os; print(os.path.join(sysconfig.get_path("scripts"), "nats-server"))')"
  head -c 4 "$real" | grep -q ELF || { echo "image.sh: cannot find the nats-server binary (tried $(command -v nats-server) and $real)" >&2; exit 1; }
  cp "$real" "$context/prebuilt/nats-server"
fi
echo "==> $engine build -t $tag (BINARIES=prebuilt, RUNTIME_IMAGE=$base)"
"$engine" build "${build_flags[@]}" --build-arg BINARIES=prebuilt \
  --build-arg RUNTIME_IMAGE="$base" --build-arg AGORA_COMMIT="$commit" -t "$tag" "$context"
echo "==> built $tag: $("$engine" image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')"
