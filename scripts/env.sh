# Sourced by ./dev and .ci/run: the build environment every cargo command here shares.
#
# - CARGO_TARGET_DIR: one build cache outside the clone, so every checkout (and CI) reuses it.
# - PROTOC: tonic's codegen and lance's build scripts both need protoc. We take the binary that the
#   `protoc-bin-vendored` crate ships (already a locked build dependency), so nothing is installed
#   system-wide and no root is needed. An explicit PROTOC or a protoc on PATH wins.
# - RAYON_NUM_THREADS: candle re-reads /proc/cpuinfo on every op unless it is set.
# - CARGO_INCREMENTAL=0: see below.
set -euo pipefail

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/distillery/target}"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc 2>/dev/null || echo 2)}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Incremental caches of the optimised workspace crates grow by gigabytes per change and filled
# the disk; a full rebuild of our crates costs a few minutes instead.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

if [ -z "${PROTOC:-}" ]; then
  if command -v protoc >/dev/null 2>&1; then
    PROTOC="$(command -v protoc)"
  else
    cargo fetch --locked >/dev/null 2>&1 || cargo fetch >/dev/null
    case "$(uname -m)" in
      x86_64) arch=linux-x86_64 ;;
      aarch64) arch=linux-aarch_64 ;;
      *) echo "no vendored protoc for $(uname -m); install protoc and set PROTOC" >&2; exit 1 ;;
    esac
    pkg="protoc-bin-vendored-${arch}"
    manifest="$(cargo metadata --format-version 1 --locked 2>/dev/null \
      | grep -o "\"manifest_path\":\"[^\"]*/${pkg}-[0-9.]*/Cargo.toml\"" | head -n1 | cut -d'"' -f4)"
    [ -n "$manifest" ] || { echo "could not locate $pkg in cargo metadata" >&2; exit 1; }
    PROTOC="$(dirname "$manifest")/bin/protoc"
    chmod +x "$PROTOC" 2>/dev/null || true
  fi
  export PROTOC
fi
