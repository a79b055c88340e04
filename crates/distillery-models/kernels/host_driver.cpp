// Runs the kernels of this folder on the host (see host.h) for `tests/cuda_kernels_on_host.rs`,
// with the launch shapes `src/nn/cuda.rs` uses: grid-stride kernels on a few small blocks (so
// several threads share the work), reductions on `(channels, parts)` blocks of 256 threads.
//
//   host_driver DIR dw N C H W STRIDE PAD HO WO PARTS      x, k, gy → y, gx, gk
//   host_driver DIR bn N C HW RELU6 PARTS EPS              x, gamma, beta, g → y, stats, red, dx
//   host_driver DIR adamw N LR B1 B2 EPS BC1 BC2 DECAY     p, mv, g → p, mv
//   host_driver DIR ep N C HW FLAGS ADDS                   x, [scale], [shift], [a0..] → y
//
// Arrays are raw little-endian f32 files DIR/NAME.bin (f64 for stats and red).
#include "host.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#include "adamw.cu"
#undef INSTANTIATE
#include "batchnorm.cu"
#undef INSTANTIATE
#undef BLOCK
#include "depthwise.cu"
#undef INSTANTIATE
#include "epilogue.cu"

static std::string dir;

template <typename T>
static std::vector<T> load(const char *name, size_t n) {
    std::vector<T> v(n);
    std::string path = dir + "/" + name + ".bin";
    FILE *f = std::fopen(path.c_str(), "rb");
    if (!f || std::fread(v.data(), sizeof(T), n, f) != n) {
        std::fprintf(stderr, "cannot read %zu values from %s\n", n, path.c_str());
        std::exit(2);
    }
    std::fclose(f);
    return v;
}

template <typename T>
static void save(const char *name, const std::vector<T> &v) {
    std::string path = dir + "/" + name + ".bin";
    FILE *f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) {
        std::fprintf(stderr, "cannot write %s\n", path.c_str());
        std::exit(2);
    }
    std::fclose(f);
}

// Small grids for the grid-stride kernels: 2 blocks of 3 threads.
static const dim3 SMALL_GRID{2}, SMALL_BLOCK{3};

int main(int argc, char **argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: host_driver DIR dw|bn|adamw ...\n");
        return 2;
    }
    dir = argv[1];
    std::string op = argv[2];
    auto I = [&](int i) { return std::atoll(argv[i]); };
    auto D = [&](int i) { return std::atof(argv[i]); };
    if (op == "dw" && argc == 12) {
        int n = I(3), c = I(4), h = I(5), w = I(6), s = I(7), p = I(8), ho = I(9), wo = I(10), parts = I(11);
        long long planes = (long long)n * c;
        auto x = load<float>("x", planes * h * w), k = load<float>("k", c * 9), gy = load<float>("gy", planes * ho * wo);
        std::vector<float> y(planes * ho * wo), gx(planes * h * w), gk(c * 9);
        std::vector<double> partial((size_t)c * parts * 9);
        launch(SMALL_GRID, SMALL_BLOCK, [&] { dw3x3_fwd_f32(x.data(), k.data(), y.data(), planes, c, h, w, ho, wo, s, p); });
        launch(SMALL_GRID, SMALL_BLOCK,
               [&] { dw3x3_bwd_input_f32(gy.data(), k.data(), gx.data(), planes, c, h, w, ho, wo, s, p); });
        launch({(unsigned)c, (unsigned)parts}, {BLOCK}, [&] {
            dw3x3_bwd_weight_parts_f32(x.data(), gy.data(), partial.data(), n, c, h, w, ho, wo, s, p);
        });
        launch(SMALL_GRID, {(unsigned)(c * 9 + 1) / 2}, [&] { dw3x3_bwd_weight_sum_f32(partial.data(), gk.data(), c, parts); });
        save("y", y);
        save("gx", gx);
        save("gk", gk);
    } else if (op == "bn" && argc == 9) {
        int n = I(3), c = I(4), relu6 = I(6), parts = I(7);
        long long hw = I(5), total = (long long)n * c * hw;
        double eps = D(8), m = (double)n * hw;
        auto x = load<float>("x", total), gamma = load<float>("gamma", c), beta = load<float>("beta", c);
        auto g = load<float>("g", total);
        std::vector<double> partial((size_t)c * parts * 2), stats(3 * c), red(2 * c);
        std::vector<float> y(total), dx(total);
        dim3 per_channel{(unsigned)c, (unsigned)parts}, finish{(unsigned)(c + 1) / 2};
        launch(per_channel, {256}, [&] { bn_stats_parts_f32(x.data(), partial.data(), n, c, hw); });
        launch(SMALL_GRID, finish, [&] { bn_stats_finish(partial.data(), stats.data(), c, parts, m, eps); });
        launch(SMALL_GRID, SMALL_BLOCK, [&] {
            bn_apply_f32(x.data(), gamma.data(), beta.data(), stats.data(), y.data(), total, c, hw, relu6);
        });
        launch(per_channel, {256}, [&] {
            bn_grad_parts_f32(x.data(), g.data(), y.data(), stats.data(), partial.data(), n, c, hw, relu6);
        });
        launch(SMALL_GRID, finish, [&] { bn_grad_finish(partial.data(), stats.data(), red.data(), c, parts); });
        launch(SMALL_GRID, SMALL_BLOCK, [&] {
            bn_grad_input_f32(x.data(), g.data(), y.data(), gamma.data(), stats.data(), red.data(), dx.data(), total, c,
                              hw, m, relu6);
        });
        save("y", y);
        save("stats", stats);
        save("red", red);
        save("dx", dx);
    } else if (op == "adamw" && argc == 11) {
        long long n = I(3);
        float lr = D(4), b1 = D(5), b2 = D(6), eps = D(7), bc1 = D(8), bc2 = D(9), decay = D(10);
        auto p = load<float>("p", n), mv = load<float>("mv", 2 * n), g = load<float>("g", n);
        launch(SMALL_GRID, SMALL_BLOCK, [&] { adamw_moments_f32(mv.data(), g.data(), n, b1, b2); });
        launch(SMALL_GRID, SMALL_BLOCK, [&] { adamw_param_f32(p.data(), mv.data(), n, lr, eps, bc1, bc2, decay); });
        save("p", p);
        save("mv", mv);
    } else if (op == "ep" && argc == 8) {
        long long n = I(3), c = I(4), hw = I(5), total = n * c * hw;
        int flags = I(6), adds = I(7);
        auto x = load<float>("x", total);
        // What does not apply is a copy of x, never read (nn::cuda passes x itself).
        auto maybe = [&](bool on, const char *name, size_t len) { return on ? load<float>(name, len) : x; };
        auto scale = maybe(flags & EPI_SCALE, "scale", c), shift = maybe(flags & EPI_SHIFT, "shift", c);
        auto a0 = maybe(adds > 0, "a0", total), a1 = maybe(adds > 1, "a1", total), a2 = maybe(adds > 2, "a2", total);
        std::vector<float> y(total);
        launch(SMALL_GRID, SMALL_BLOCK, [&] {
            channel_epilogue_f32(x.data(), scale.data(), shift.data(), a0.data(), a1.data(), a2.data(), y.data(),
                                 total, (int)c, hw, flags, adds);
        });
        save("y", y);
    } else {
        std::fprintf(stderr, "host_driver: unknown command or wrong argument count: %s (%d arguments)\n", op.c_str(),
                     argc);
        return 2;
    }
    return 0;
}
