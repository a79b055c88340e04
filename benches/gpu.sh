#!/usr/bin/env bash
# Distillery's teacher and student benchmarks on an NVIDIA GPU, beside PyTorch on the same GPU.
#
#   benches/gpu.sh build [DIR]   on a build machine (Rust; no GPU needed): builds the emonet,
#                                student_train and onnx_faceapi benches with CUDA and packs them,
#                                stripped, with the face-api model into DIR (default .gpu/, ignored
#                                by git). Uses nvcc from PATH, else scripts/cuda-toolkit.sh's.
#   benches/gpu.sh run [DIR]     on the GPU machine, from the checkout's root (CUDA driver and
#                                libraries, python3 with PyTorch; no Rust): runs each bench on
#                                cuda:0, then benches/reference/bench_pytorch.py with DEVICE=cuda;
#                                prints every result and keeps them in DIR/results.txt.
#   benches/gpu.sh bisect [DIR]  on the GPU machine: the student bench at one shape (default
#                                224x128) with each set of our CUDA kernel families on and off,
#                                launches synchronous, to find what a fault depends on; then one
#                                step under compute-sanitizer's memcheck (the machine's own, or
#                                the one `build` packs from PyPI), which names the kernel and
#                                address of an out-of-bounds access.
#
# CUDA_COMPUTE_CAP (default 90, Hopper) picks the GPU generation the kernels are compiled for;
# FEATURES (default distillery-models/cudnn; distillery-models/cuda without cuDNN) the backend.
# Sizes: EMONET_BENCH_BATCHES, STUDENT_BENCH_SHAPES, EMONET_BENCH_ITERS, STUDENT_BENCH_STEPS
# (defaults below, larger than the CPU benches': a GPU only fills up at larger batches);
# BENCH_TIMEOUT (default 180 s) bounds each program. For a short run: EXTRAS=0 skips the TF32
# and bf16 passes, BASELINE=0 the teachers' second pass without the `epilogue` and `conv-algo`
# families, PYTORCH=0 the PyTorch reference, RUN="student_train onnx_faceapi" runs only those
# benches.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
dir="${2:-.gpu}"
benches=(emonet student_train onnx_faceapi)

# The run-time environment on the GPU machine: the CUDA libraries the binaries link, wherever this
# machine keeps them (a CUDA install or PyTorch's nvidia-* wheels), and the benches' settings.
gpu_env() {
  [ -d "$dir/bin" ] || { echo "$dir/bin: missing; run \`benches/gpu.sh build\` first" >&2; exit 1; }
  local libs="" lib found
  for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudnn.so.9; do
    found="$(find /usr/local /usr/lib /opt -name "$lib" -print -quit 2>/dev/null || true)"
    [ -n "$found" ] || { echo "$lib: not found under /usr/local, /usr/lib or /opt" >&2; exit 1; }
    case ":$libs:" in *":$(dirname "$found"):"*) ;; *) libs="$libs:$(dirname "$found")" ;; esac
  done
  export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export DISTILLERY_DEVICE=cuda DEVICE=cuda DISTILLERY_SOURCE="$PWD" DISTILLERY_REFERENCE="$PWD/$dir/reference"
  for b in "${benches[@]}"; do
    gunzip -kf "$dir/bin/$b.gz"
    chmod +x "$dir/bin/$b"
  done
}

case "$mode" in
  build)
    source scripts/env.sh
    if ! command -v nvcc >/dev/null 2>&1; then
      toolkit="$(scripts/cuda-toolkit.sh)"
      export PATH="$toolkit/bin:$PATH" CUDA_ROOT="$toolkit"
    fi
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    log="$(mktemp)"
    args=()
    for b in "${benches[@]}"; do args+=(--bench "$b"); done
    cargo bench --workspace --profile dev --locked --features "${FEATURES:-distillery-models/cudnn}" --no-run "${args[@]}" 2>&1 | tee "$log"
    rm -rf "$dir"
    mkdir -p "$dir/bin" "$dir/reference/teachers"
    for b in "${benches[@]}"; do
      exe="$(sed -n "s|^ *Executable benches/$b.rs (\(.*\))$|\1|p" "$log" | tail -n1)"
      [ -x "$exe" ] || { echo "no executable for bench $b in the cargo output" >&2; exit 1; }
      strip -o "$dir/bin/$b" "$exe"
      gzip -9 "$dir/bin/$b"
    done
    rm -f "$log"
    # compute-sanitizer for `bisect`, for GPU machines whose CUDA install lacks it (SANITIZER=0
    # skips it; about 14 MB packed).
    if [ "${SANITIZER:-1}" != 0 ]; then
      wheels="$(mktemp -d)"
      if python3 -m pip download -q --no-deps --only-binary=:all: -d "$wheels" 'nvidia-cuda-sanitizer-api==13.0.*' >&2 \
        && unzip -q "$wheels"/*.whl 'nvidia/cu13/bin/*' 'nvidia/cu13/lib/*' -d "$wheels/x"; then
        tar czf "$dir/sanitizer.tar.gz" -C "$wheels/x/nvidia/cu13" bin lib
      else
        echo "compute-sanitizer not packed (no PyPI?); bisect uses the GPU machine's own if it has one" >&2
      fi
      rm -rf "$wheels"
    fi
    reference="${DISTILLERY_REFERENCE:-../shared/reference}"
    cp "$reference/teachers/faceapi_expression.onnx" "$dir/reference/teachers/"
    git rev-parse HEAD >"$dir/commit"
    du -sh "$dir"
    ;;
  run)
    gpu_env
    export EMONET_BENCH_BATCHES="${EMONET_BENCH_BATCHES:-1,8,64}" EMONET_BENCH_ITERS="${EMONET_BENCH_ITERS:-20}"
    export STUDENT_BENCH_SHAPES="${STUDENT_BENCH_SHAPES:-112x32,224x16,224x128}"
    export STUDENT_BENCH_STEPS="${STUDENT_BENCH_STEPS:-10}"
    results="$dir/results.txt"
    limit="${BENCH_TIMEOUT:-180}" # seconds per program, so one slow bench cannot eat the others' time
    {
      echo "# $(date -u +%FT%TZ) commit $(cat "$dir/commit" 2>/dev/null || echo unknown)"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    } | tee "$results"
    status=0
    read -r -a chosen <<<"${RUN:-${benches[*]}}"
    for b in "${chosen[@]}"; do
      echo "## $b" | tee -a "$results"
      timeout "$limit" "$dir/bin/$b" 2>&1 | tee -a "$results" || { echo "FAILED: $b" | tee -a "$results"; status=1; }
    done
    # The teachers again without the one-pass epilogue and the cached cuDNN algorithms, for their
    # gain in the same run.
    if [ "${BASELINE:-1}" != 0 ]; then
      echo "## emonet, onnx_faceapi with DISTILLERY_CUDA_KERNELS=depthwise,batchnorm,adamw" | tee -a "$results"
      for b in emonet onnx_faceapi; do
        case " ${chosen[*]} " in *" $b "*) ;; *) continue ;; esac
        DISTILLERY_CUDA_KERNELS=depthwise,batchnorm,adamw timeout "$limit" "$dir/bin/$b" 2>&1 | tee -a "$results" \
          || { echo "FAILED: $b (baseline)" | tee -a "$results"; status=1; }
      done
    fi
    # TF32 tensor cores for f32 matrix products (PyTorch's default for cuDNN convolutions).
    if [ "${EXTRAS:-1}" != 0 ]; then
      echo "## emonet, student_train with DISTILLERY_TF32=1" | tee -a "$results"
      for b in emonet student_train; do
        DISTILLERY_TF32=1 timeout "$limit" "$dir/bin/$b" 2>&1 | tee -a "$results" || { echo "FAILED: $b (TF32)" | tee -a "$results"; status=1; }
      done
    fi
    if [ "${PYTORCH:-1}" != 0 ]; then
      echo "## pytorch reference" | tee -a "$results"
      timeout "$limit" python3 benches/reference/bench_pytorch.py 2>&1 | tee -a "$results" || status=1
    fi
    if [ "${EXTRAS:-1}" != 0 ]; then
      echo "## pytorch reference, emonet in bf16" | tee -a "$results"
      BENCHES=emonet_forward EMONET_BENCH_DTYPE=bf16 timeout "$limit" python3 benches/reference/bench_pytorch.py 2>&1 | tee -a "$results" || status=1
    fi
    exit "$status"
    ;;
  bisect)
    # Which of our CUDA kernel families a failing training shape depends on: the student bench at
    # $STUDENT_BENCH_SHAPES (default 224x128) with each set of families, launches synchronous so
    # a fault is reported by the launch that caused it (ours name their kernel).
    gpu_env
    export STUDENT_BENCH_SHAPES="${STUDENT_BENCH_SHAPES:-224x128}" STUDENT_BENCH_STEPS="${STUDENT_BENCH_STEPS:-3}"
    export CUDA_LAUNCH_BLOCKING=1
    limit="${BENCH_TIMEOUT:-90}"
    # KERNEL_SETS: the DISTILLERY_CUDA_KERNELS values to try, separated by spaces.
    for k in ${KERNEL_SETS:-1 0 depthwise batchnorm adamw depthwise,batchnorm depthwise,adamw}; do
      echo "## DISTILLERY_CUDA_KERNELS=$k"
      DISTILLERY_CUDA_KERNELS="$k" timeout "$limit" "$dir/bin/student_train" 2>&1 \
        | grep -vE '^ +[0-9]+: <unknown>$' || echo "FAILED with DISTILLERY_CUDA_KERNELS=$k"
    done
    # One step with every kernel under memcheck (SANITIZE=0 skips it): slow, so last.
    san="$(command -v compute-sanitizer || find /usr/local /opt -name compute-sanitizer -type f -perm -u+x -print -quit 2>/dev/null || true)"
    if [ -z "$san" ] && [ -f "$dir/sanitizer.tar.gz" ]; then
      mkdir -p "$dir/sanitizer"
      tar xzf "$dir/sanitizer.tar.gz" -C "$dir/sanitizer"
      san="$dir/sanitizer/bin/compute-sanitizer"
    fi
    if [ "${SANITIZE:-1}" = 0 ]; then
      :
    elif [ -z "$san" ]; then
      echo "## no compute-sanitizer on this machine or in $dir"
    else
      echo "## compute-sanitizer memcheck, all kernels, one step ($san)"
      STUDENT_BENCH_STEPS=1 timeout "${SANITIZE_TIMEOUT:-300}" "$san" --tool memcheck --print-limit 10 \
        --error-exitcode 3 "$dir/bin/student_train" 2>&1 | grep -vE '^ +[0-9]+: <unknown>$' \
        || echo "FAILED under memcheck"
    fi
    ;;
  *)
    # The comment block at the top, however long it grows.
    awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"
    exit 2
    ;;
esac
