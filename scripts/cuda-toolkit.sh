#!/usr/bin/env bash
# Makes a CUDA build toolkit for `cargo build --features cuda` from NVIDIA's PyPI wheels, for build
# machines without a CUDA install (no root, no GPU needed):
#
#   scripts/cuda-toolkit.sh [DIR]      # default ~/.cache/distillery/cuda-13.0; prints DIR
#
# DIR gets nvcc (with cicc, ptxas and the CUDA headers), the runtime, cuBLAS, cuRAND, NVRTC and
# cuDNN's front library (enough to link; cuDNN's engines load at run time), and
# lib/stubs/libcuda.so: a link-time stand-in for the driver library, which only a GPU machine's
# driver provides (the real one is loaded at run time). Then build with
#   PATH=DIR/bin:$PATH CUDA_ROOT=DIR CUDA_COMPUTE_CAP=90 cargo build --features distillery-cli/cuda
# (`benches/gpu.sh build` does this). Needs python3 with pip, unzip, gcc, and network access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-$HOME/.cache/distillery/cuda-13.0}"
if [ -x "$dir/bin/nvcc" ] && [ -f "$dir/lib/stubs/libcuda.so" ]; then
  echo "$dir"
  exit 0
fi
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# cicc lives in nvidia-nvvm; nvcc's headers in -crt and -cccl; cudarc links cudart, cublas(Lt),
# curand and nvrtc.
"$python" -m pip download -q --no-deps --only-binary=:all: -d "$work/wheels" \
  'nvidia-cuda-nvcc==13.0.*' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-crt==13.0.*' \
  'nvidia-cuda-cccl==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-nvrtc==13.0.*' \
  'nvidia-cublas==13.0.*' 'nvidia-curand==10.4.*' 'nvidia-cudnn-cu13==9.*' >&2
for w in "$work"/wheels/*.whl; do
  case "$w" in
    *cudnn*) unzip -q -o "$w" 'nvidia/cudnn/include/*' 'nvidia/cudnn/lib/libcudnn.so.9' -d "$work/x" ;;
    *) unzip -q -o "$w" -d "$work/x" ;;
  esac
done
mkdir -p "$(dirname "$dir")"
rm -rf "$dir"
mv "$work/x/nvidia/cu13" "$dir"
ln -s lib "$dir/lib64"
cp "$work"/x/nvidia/cudnn/include/* "$dir/include/"
cp "$work"/x/nvidia/cudnn/lib/libcudnn.so.9 "$dir/lib/"
for lib in "$dir"/lib/lib{cudart,cublas,cublasLt,curand,nvrtc,cudnn}.so.*; do
  case "$lib" in *.alt.*) continue ;; esac
  ln -sf "$(basename "$lib")" "${lib%%.so.*}.so"
done
# The driver stub: every driver function cudarc declares, each returning CUDA_ERROR_UNKNOWN (999).
# Only its names matter: the linker needs them, and at run time the GPU machine's libcuda.so.1
# (same soname) is loaded instead.
source scripts/env.sh
sys="$(cargo metadata --format-version 1 --locked --features distillery-models/cuda 2>/dev/null \
  | grep -o '"manifest_path":"[^"]*/cudarc-[0-9.]*/Cargo.toml"' | head -n1 | cut -d'"' -f4)"
[ -n "$sys" ] || { echo "could not locate cudarc in cargo metadata" >&2; exit 1; }
sys="$(dirname "$sys")/src/driver/sys/mod.rs"
grep -oE 'pub (unsafe )?fn cu[A-Za-z0-9_]*' "$sys" | awk '{print $NF}' | sort -u \
  | awk '{print "int " $1 "(void) { return 999; }"}' >"$work/stub.c"
mkdir -p "$dir/lib/stubs"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 "$work/stub.c" -o "$dir/lib/stubs/libcuda.so"
"$dir/bin/nvcc" --version | tail -n1 >&2
echo "$dir"
