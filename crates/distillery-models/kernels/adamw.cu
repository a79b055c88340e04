// The AdamW update (decoupled weight decay) as two in-place elementwise kernels, for f32 and f64.
// Compiled to PTX by build.rs with the `cuda` feature and loaded by `nn::cuda`.
//
// mv holds a parameter's moments, m in [0, n) and v in [n, 2n).
//   moments: m ← β1·m + (1−β1)·g,  v ← β2·v + (1−β2)·g²
//   param:   θ ← θ·decay − lr · (m/bc1) / (√(v/bc2) + ε)

template <typename T>
__device__ __forceinline__ void moments(T *__restrict__ mv, const T *__restrict__ g, long long n, T b1, T b2) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        T gi = g[i];
        mv[i] = b1 * mv[i] + (T(1) - b1) * gi;
        mv[n + i] = b2 * mv[n + i] + (T(1) - b2) * (gi * gi);
    }
}

template <typename T>
__device__ __forceinline__ void param(T *__restrict__ p, const T *__restrict__ mv, long long n, T lr, T eps,
                                      T bc1, T bc2, T decay) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        T m_hat = mv[i] / bc1;
        T v_hat = mv[n + i] / bc2;
        p[i] = p[i] * decay - lr * (m_hat / (sqrt(v_hat) + eps));
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                              \
    extern "C" __global__ void adamw_moments_##SUFFIX(T *mv, const T *g, long long n, T b1, T b2) {         \
        moments<T>(mv, g, n, b1, b2);                                                                        \
    }                                                                                                         \
    extern "C" __global__ void adamw_param_##SUFFIX(T *p, const T *mv, long long n, T lr, T eps, T bc1,     \
                                                    T bc2, T decay) {                                        \
        param<T>(p, mv, n, lr, eps, bc1, bc2, decay);                                                        \
    }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
