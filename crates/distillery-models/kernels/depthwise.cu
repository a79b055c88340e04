// 3×3 depthwise convolution on CUDA: forward and both gradients, for f32 and f64.
//
// Compiled to PTX by build.rs when the `cuda` feature is on and loaded by `nn::cuda`. Layouts are
// contiguous NCHW: x [n, c, h, w], kernel [c, 1, 3, 3], y [n, c, ho, wo], with
// y[oy, ox] = Σ k[ky, kx] · x[oy·s + ky − p, ox·s + kx − p] (zero outside the image), where p is
// the padding before the first row and column (the size of the output fixes the rest).
//
// The forward and input-gradient kernels give one thread one output element. The weight gradient
// is a reduction over n·ho·wo per channel: blocks (channel, part) each sum a contiguous part of
// it into nine double partials, and a second kernel adds the parts in order, so the result does
// not depend on scheduling.

#define BLOCK 256

template <typename T>
__device__ __forceinline__ void fwd(const T *__restrict__ x, const T *__restrict__ k, T *__restrict__ y,
                                    long long planes, int c, int h, int w, int ho, int wo, int s, int p) {
    long long total = planes * ho * wo;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ox = (int)(i % wo);
        long long t = i / wo;
        int oy = (int)(t % ho);
        long long plane = t / ho;
        const T *xp = x + plane * h * w;
        const T *kp = k + (plane % c) * 9;
        T acc = 0;
#pragma unroll
        for (int ky = 0; ky < 3; ++ky) {
            int iy = oy * s + ky - p;
            if (iy < 0 || iy >= h) continue;
#pragma unroll
            for (int kx = 0; kx < 3; ++kx) {
                int ix = ox * s + kx - p;
                if (ix < 0 || ix >= w) continue;
                acc += kp[ky * 3 + kx] * xp[(long long)iy * w + ix];
            }
        }
        y[i] = acc;
    }
}

// grad_x[iy, ix] = Σ k[ky, kx] · grad_y[oy, ox] over the taps with oy·s + ky − p = iy and
// ox·s + kx − p = ix.
template <typename T>
__device__ __forceinline__ void bwd_input(const T *__restrict__ gy, const T *__restrict__ k, T *__restrict__ gx,
                                          long long planes, int c, int h, int w, int ho, int wo, int s, int p) {
    long long total = planes * h * w;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ix = (int)(i % w);
        long long t = i / w;
        int iy = (int)(t % h);
        long long plane = t / h;
        const T *gp = gy + plane * ho * wo;
        const T *kp = k + (plane % c) * 9;
        T acc = 0;
#pragma unroll
        for (int ky = 0; ky < 3; ++ky) {
            int ny = iy + p - ky;
            if (ny < 0 || ny % s != 0 || ny / s >= ho) continue;
            int oy = ny / s;
#pragma unroll
            for (int kx = 0; kx < 3; ++kx) {
                int nx = ix + p - kx;
                if (nx < 0 || nx % s != 0 || nx / s >= wo) continue;
                acc += kp[ky * 3 + kx] * gp[(long long)oy * wo + nx / s];
            }
        }
        gx[i] = acc;
    }
}

// Grid (c, parts): block (ch, part) sums its share of the n·ho·wo products of channel ch into
// partial[(ch·parts + part)·9 + tap].
template <typename T>
__device__ __forceinline__ void bwd_weight_parts(const T *__restrict__ x, const T *__restrict__ gy,
                                                 double *__restrict__ partial, int n, int c, int h, int w,
                                                 int ho, int wo, int s, int p) {
    __shared__ double red[9][BLOCK];
    int ch = blockIdx.x, part = blockIdx.y, parts = gridDim.y, tid = threadIdx.x;
    long long per = (long long)n * ho * wo;
    long long chunk = (per + parts - 1) / parts;
    long long lo = part * chunk, hi = min(per, lo + chunk);
    double acc[9];
#pragma unroll
    for (int q = 0; q < 9; ++q) acc[q] = 0.0;
    for (long long j = lo + tid; j < hi; j += BLOCK) {
        int ox = (int)(j % wo);
        long long t = j / wo;
        int oy = (int)(t % ho);
        long long b = t / ho;
        long long plane = b * c + ch;
        double g = (double)gy[plane * ho * wo + (long long)oy * wo + ox];
        const T *xp = x + plane * h * w;
#pragma unroll
        for (int ky = 0; ky < 3; ++ky) {
            int iy = oy * s + ky - p;
            if (iy < 0 || iy >= h) continue;
#pragma unroll
            for (int kx = 0; kx < 3; ++kx) {
                int ix = ox * s + kx - p;
                if (ix < 0 || ix >= w) continue;
                acc[ky * 3 + kx] += g * (double)xp[(long long)iy * w + ix];
            }
        }
    }
#pragma unroll
    for (int q = 0; q < 9; ++q) red[q][tid] = acc[q];
    __syncthreads();
    for (int half = BLOCK / 2; half > 0; half >>= 1) {
        if (tid < half) {
#pragma unroll
            for (int q = 0; q < 9; ++q) red[q][tid] += red[q][tid + half];
        }
        __syncthreads();
    }
    if (tid < 9) partial[((long long)ch * parts + part) * 9 + tid] = red[tid][0];
}

// One thread per (channel, tap): grad_k = Σ over parts, in order.
template <typename T>
__device__ __forceinline__ void bwd_weight_sum(const double *__restrict__ partial, T *__restrict__ gk, int c,
                                               int parts) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= c * 9) return;
    int ch = i / 9, q = i % 9;
    double acc = 0.0;
    for (int part = 0; part < parts; ++part) acc += partial[((long long)ch * parts + part) * 9 + q];
    gk[i] = (T)acc;
}

#define INSTANTIATE(T, SUFFIX)                                                                            \
    extern "C" __global__ void dw3x3_fwd_##SUFFIX(const T *x, const T *k, T *y, long long planes, int c,      \
                                                  int h, int w, int ho, int wo, int s, int p) {             \
        fwd<T>(x, k, y, planes, c, h, w, ho, wo, s, p);                                                    \
    }                                                                                                       \
    extern "C" __global__ void dw3x3_bwd_input_##SUFFIX(const T *gy, const T *k, T *gx, long long planes,   \
                                                        int c, int h, int w, int ho, int wo, int s, int p) { \
        bwd_input<T>(gy, k, gx, planes, c, h, w, ho, wo, s, p);                                            \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                     \
        dw3x3_bwd_weight_parts_##SUFFIX(const T *x, const T *gy, double *partial, int n, int c, int h,      \
                                        int w, int ho, int wo, int s, int p) {                              \
        bwd_weight_parts<T>(x, gy, partial, n, c, h, w, ho, wo, s, p);                                     \
    }                                                                                                       \
    extern "C" __global__ void dw3x3_bwd_weight_sum_##SUFFIX(const double *partial, T *gk, int c,          \
                                                             int parts) {                                   \
        bwd_weight_sum<T>(partial, gk, c, parts);                                                          \
    }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
