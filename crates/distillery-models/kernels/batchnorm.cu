// Training-mode batch norm on CUDA (with an optional fused ReLU6), for f32 and f64 inputs.
// Compiled to PTX by build.rs with the `cuda` feature and loaded by `nn::cuda`.
//
// x, y, g are contiguous [n, c, hw]. Per channel, over m = n·hw values:
//   forward:  μ, σ² (biased), σ⁻¹ = 1/√(σ² + ε) into stats [3, c] (f64); y = (x − μ)·γσ⁻¹ + β,
//             clamped to [0, 6] with the ReLU6.
//   backward: g' = g where 0 < y < 6 (with the ReLU6), else g; ∂γ = σ⁻¹·Σg'(x − μ), ∂β = Σg'
//             into red [2, c] (f64); ∂x = k·g' + b·x + e with k = γσ⁻¹, b = −kσ⁻¹∂γ/m,
//             e = −k∂β/m − bμ.
// Reductions run in two kernels: blocks (channel, part) sum a contiguous share of the channel's
// m values in f64, then one thread per channel adds the parts in order (no atomics, so results do
// not depend on scheduling).

#define BLOCK 256

// Sums two values over the block; the result is valid in thread 0.
__device__ __forceinline__ void block_sum2(double &a, double &b) {
    __shared__ double ra[BLOCK], rb[BLOCK];
    int tid = threadIdx.x;
    ra[tid] = a;
    rb[tid] = b;
    __syncthreads();
    for (int half = BLOCK / 2; half > 0; half >>= 1) {
        if (tid < half) {
            ra[tid] += ra[tid + half];
            rb[tid] += rb[tid + half];
        }
        __syncthreads();
    }
    a = ra[0];
    b = rb[0];
}

__device__ __forceinline__ void part_range(long long per, long long &lo, long long &hi) {
    long long parts = gridDim.y, chunk = (per + parts - 1) / parts;
    lo = blockIdx.y * chunk;
    hi = min(per, lo + chunk);
}

template <typename T>
__device__ __forceinline__ void stats_parts(const T *__restrict__ x, double *__restrict__ partial, int n, int c,
                                            long long hw) {
    int ch = blockIdx.x;
    long long lo, hi;
    part_range((long long)n * hw, lo, hi);
    double s = 0.0, ss = 0.0;
    for (long long j = lo + threadIdx.x; j < hi; j += BLOCK) {
        long long b = j / hw, k = j % hw;
        double v = (double)x[(b * c + ch) * hw + k];
        s += v;
        ss += v * v;
    }
    block_sum2(s, ss);
    if (threadIdx.x == 0) {
        long long at = ((long long)ch * gridDim.y + blockIdx.y) * 2;
        partial[at] = s;
        partial[at + 1] = ss;
    }
}

extern "C" __global__ void bn_stats_finish(const double *__restrict__ partial, double *__restrict__ stats, int c,
                                           int parts, double m, double eps) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double s = 0.0, ss = 0.0;
    for (int p = 0; p < parts; ++p) {
        s += partial[((long long)ch * parts + p) * 2];
        ss += partial[((long long)ch * parts + p) * 2 + 1];
    }
    double mean = s / m;
    double var = fmax(ss / m - mean * mean, 0.0);
    stats[ch] = mean;
    stats[c + ch] = var;
    stats[2 * c + ch] = 1.0 / sqrt(var + eps);
}

template <typename T>
__device__ __forceinline__ void apply(const T *__restrict__ x, const T *__restrict__ gamma, const T *__restrict__ beta,
                                      const double *__restrict__ stats, T *__restrict__ y, long long total, int c,
                                      long long hw, int relu6) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)((i / hw) % c);
        double a = stats[2 * c + ch] * (double)gamma[ch];
        T scale = (T)a, shift = (T)((double)beta[ch] - stats[ch] * a);
        T v = x[i] * scale + shift;
        if (relu6) v = v < T(0) ? T(0) : (v > T(6) ? T(6) : v);
        y[i] = v;
    }
}

template <typename T>
__device__ __forceinline__ T passed(T g, T y, int relu6) {
    return (!relu6 || (y > T(0) && y < T(6))) ? g : T(0);
}

template <typename T>
__device__ __forceinline__ void grad_parts(const T *__restrict__ x, const T *__restrict__ g, const T *__restrict__ y,
                                           const double *__restrict__ stats, double *__restrict__ partial, int n,
                                           int c, long long hw, int relu6) {
    int ch = blockIdx.x;
    double mean = stats[ch];
    long long lo, hi;
    part_range((long long)n * hw, lo, hi);
    double dg = 0.0, db = 0.0;
    for (long long j = lo + threadIdx.x; j < hi; j += BLOCK) {
        long long b = j / hw, k = j % hw, at = (b * c + ch) * hw + k;
        double gv = (double)passed(g[at], y[at], relu6);
        db += gv;
        dg += gv * ((double)x[at] - mean);
    }
    block_sum2(dg, db);
    if (threadIdx.x == 0) {
        long long at = ((long long)ch * gridDim.y + blockIdx.y) * 2;
        partial[at] = dg;
        partial[at + 1] = db;
    }
}

extern "C" __global__ void bn_grad_finish(const double *__restrict__ partial, const double *__restrict__ stats,
                                          double *__restrict__ red, int c, int parts) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double dg = 0.0, db = 0.0;
    for (int p = 0; p < parts; ++p) {
        dg += partial[((long long)ch * parts + p) * 2];
        db += partial[((long long)ch * parts + p) * 2 + 1];
    }
    red[ch] = dg * stats[2 * c + ch];
    red[c + ch] = db;
}

template <typename T>
__device__ __forceinline__ void grad_input(const T *__restrict__ x, const T *__restrict__ g, const T *__restrict__ y,
                                           const T *__restrict__ gamma, const double *__restrict__ stats,
                                           const double *__restrict__ red, T *__restrict__ dx, long long total, int c,
                                           long long hw, double m, int relu6) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)((i / hw) % c);
        double inv = stats[2 * c + ch], mean = stats[ch];
        double k = (double)gamma[ch] * inv;
        double bx = -k * inv * red[ch] / m;
        double e = -k * red[c + ch] / m - bx * mean;
        dx[i] = (T)k * passed(g[i], y[i], relu6) + (T)bx * x[i] + (T)e;
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                                   \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                          \
        bn_stats_parts_##SUFFIX(const T *x, double *partial, int n, int c, long long hw) {                       \
        stats_parts<T>(x, partial, n, c, hw);                                                                     \
    }                                                                                                              \
    extern "C" __global__ void bn_apply_##SUFFIX(const T *x, const T *gamma, const T *beta, const double *stats, \
                                                 T *y, long long total, int c, long long hw, int relu6) {         \
        apply<T>(x, gamma, beta, stats, y, total, c, hw, relu6);                                                  \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                          \
        bn_grad_parts_##SUFFIX(const T *x, const T *g, const T *y, const double *stats, double *partial, int n,  \
                               int c, long long hw, int relu6) {                                                  \
        grad_parts<T>(x, g, y, stats, partial, n, c, hw, relu6);                                                  \
    }                                                                                                              \
    extern "C" __global__ void bn_grad_input_##SUFFIX(const T *x, const T *g, const T *y, const T *gamma,        \
                                                      const double *stats, const double *red, T *dx,             \
                                                      long long total, int c, long long hw, double m, int relu6) { \
        grad_input<T>(x, g, y, gamma, stats, red, dx, total, c, hw, m, relu6);                                    \
    }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
