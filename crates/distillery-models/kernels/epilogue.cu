// One pass over a tensor after a convolution or before one, for f32 and f64: a per-channel
// scale and shift (an inference batch norm, a bias), up to three tensors of the same shape added,
// then an optional ReLU. Compiled to PTX by build.rs with the `cuda` feature and loaded by
// `nn::cuda`; it replaces the two to five candle kernels (each with its broadcast indexing and its
// own output) that the same step costs otherwise.
//
// x, the operands and y are contiguous [n, c, hw]; scale and shift are [c]:
//   y = relu?(x·scale[ch] + shift[ch] + a0 + a1 + a2)
// `flags` says which of scale, shift and the ReLU apply; `adds` how many operands are read.
// Pointers that do not apply are never read.

#define EPI_SCALE 1
#define EPI_SHIFT 2
#define EPI_RELU 4

template <typename T>
__device__ __forceinline__ void channel_epilogue(const T *__restrict__ x, const T *__restrict__ scale,
                                                 const T *__restrict__ shift, const T *__restrict__ a0,
                                                 const T *__restrict__ a1, const T *__restrict__ a2,
                                                 T *__restrict__ y, long long total, int c, long long hw,
                                                 int flags, int adds) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        T v = x[i];
        if (flags & (EPI_SCALE | EPI_SHIFT)) {
            int ch = (int)((i / hw) % c);
            if (flags & EPI_SCALE) v *= scale[ch];
            if (flags & EPI_SHIFT) v += shift[ch];
        }
        if (adds > 0) v += a0[i];
        if (adds > 1) v += a1[i];
        if (adds > 2) v += a2[i];
        if ((flags & EPI_RELU) && !(v > T(0))) v = T(0);
        y[i] = v;
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                                     \
    extern "C" __global__ void channel_epilogue_##SUFFIX(const T *x, const T *scale, const T *shift, const T *a0, \
                                                         const T *a1, const T *a2, T *y, long long total, int c,  \
                                                         long long hw, int flags, int adds) {                     \
        channel_epilogue<T>(x, scale, shift, a0, a1, a2, y, total, c, hw, flags, adds);                            \
    }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
