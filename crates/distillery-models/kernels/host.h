// CUDA's kernel-side built-ins on the host, so the kernels of this folder compile as C++ and run
// on a CPU: `tests/cuda_kernels_on_host.rs` checks them against the CPU ops this way (under
// AddressSanitizer) on machines without a GPU.
//
// A launch runs its blocks one after another and the threads of a block concurrently (one
// std::thread each), `__syncthreads()` being a barrier across them; `__shared__` variables are
// statics, which is exact while one block runs at a time.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <functional>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<> *block_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define __launch_bounds__(n)

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

using std::fmax;
using std::max;
using std::min;
using std::sqrt;

// Runs `kernel` (a call of one of the kernels) over `grid` blocks of `block` threads.
inline void launch(dim3 grid, dim3 block, const std::function<void()> &kernel) {
    gridDim = grid;
    blockDim = block;
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::barrier<> barrier(block.x);
            block_barrier = &barrier;
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < block.x; ++t) {
                threads.emplace_back([&, t, bx, by] {
                    blockIdx.x = bx;
                    blockIdx.y = by;
                    threadIdx.x = t;
                    kernel();
                });
            }
            for (auto &t : threads) t.join();
        }
    }
}
