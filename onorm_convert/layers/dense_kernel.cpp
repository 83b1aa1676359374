// Online Normalization training passes for dense (N, C) activations, one sample per row.
//
// With one value per sample and channel, every per-sample statistic is as large as the
// activations, so a batch-parallel scan would write and re-read several (N, C) tensors.
// Here each block of channels walks the stream t = 0..N-1 once, the channel loop innermost
// (contiguous, vectorized), the recurrent state of its channels held in float64 in a small
// buffer. Forward writes z; backward recomputes the forward state from the
// state before the batch instead of reading saved per-sample tensors, so a training step
// stores nothing of size (N, C) besides the input. The equations are those of
// shared/docs/online-norm.md in the form used by functional.py (the mean carried as its
// drift from mean0, so data at the stream's mean gives exactly y = 0).
//
// Built by native.py with -ffp-contract=off: forward and backward must evaluate y and z
// identically (the clamp mask is recomputed in backward), vectorized body and tail alike.
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Channel blocks [c0, c1) spread over the threads; each block walks the whole stream. A block's
// state (a few doubles per channel) stays in L1 cache; its rows are whole cache lines.
constexpr int64_t kBlock = 256;

template <typename F>
void for_channel_blocks(int64_t channels, int threads, F body) {
    const int64_t blocks = (channels + kBlock - 1) / kBlock;
    const int team = blocks < threads ? int(blocks) : threads;  // no thread woken without a block
#pragma omp parallel for num_threads(team) schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
        const int64_t c0 = block * kBlock;
        body(c0, c0 + kBlock < channels ? c0 + kBlock : channels);
    }
}

using A = double;  // the arithmetic and the recurrent state, whatever the activations' dtype

template <typename T>
inline T clamp_to(T v, T limit) {  // NaN stays NaN, as torch.clamp
    return v > limit ? limit : (v < -limit ? -limit : v);
}

template <typename T>
void forward(const T* x, T* z, int64_t n, int64_t channels, const T* mean0, const T* var0, const T* gamma,
             const T* beta, double alpha_fwd, double eps, double limit, T* mean_out, T* var_out, int threads) {
    const A a = alpha_fwd, b = 1 - alpha_fwd, ab = alpha_fwd * (1 - alpha_fwd), e = eps;
    for_channel_blocks(channels, threads, [&](int64_t c0, int64_t c1) {
        const int64_t w = c1 - c0;
        std::vector<A> drift(w, 0.0), var(var0 + c0, var0 + c1), m0(mean0 + c0, mean0 + c1);
        std::vector<A> g(gamma + c0, gamma + c1), o(beta + c0, beta + c1);
        A *dr = drift.data(), *vr = var.data(), *mu0 = m0.data(), *gm = g.data(), *of = o.data();
        for (int64_t t = 0; t < n; ++t) {
            const T* xt = x + t * channels + c0;
            T* zt = z + t * channels + c0;
#pragma omp simd
            for (int64_t j = 0; j < w; ++j) {
                const A d = (A(xt[j]) - mu0[j]) - dr[j];
                const A y = d * (1 / std::sqrt(vr[j] + e));
                zt[j] = clamp_to(T(y * gm[j] + of[j]), T(limit));
                vr[j] = a * vr[j] + ab * (d * d);
                dr[j] += b * d;
            }
        }
        for (int64_t j = 0; j < w; ++j) {
            mean_out[c0 + j] = T(mu0[j] + dr[j]);
            var_out[c0 + j] = T(vr[j]);
        }
    });
}

template <typename T>
void backward(const T* grad, const T* x, T* grad_x, int64_t n, int64_t channels, const T* mean0, const T* var0,
              const T* gamma, const T* beta, double alpha_fwd, double alpha_bkw, double eps, double limit, T* u_io,
              T* v_io, T* grad_weight, T* grad_bias, int threads) {
    const A a = alpha_fwd, b = 1 - alpha_fwd, ab = alpha_fwd * (1 - alpha_fwd), e = eps, cb = 1 - alpha_bkw;
    for_channel_blocks(channels, threads, [&](int64_t c0, int64_t c1) {
        const int64_t w = c1 - c0;
        std::vector<A> drift(w, 0.0), var(var0 + c0, var0 + c1), m0(mean0 + c0, mean0 + c1);
        std::vector<A> g(gamma + c0, gamma + c1), o(beta + c0, beta + c1), u(u_io + c0, u_io + c1),
            v(v_io + c0, v_io + c1), sum_gy(w, 0.0), sum_g(w, 0.0);
        A *dr = drift.data(), *vr = var.data(), *mu0 = m0.data(), *gm = g.data(), *of = o.data();
        A *uu = u.data(), *vv = v.data(), *sgy = sum_gy.data(), *sg = sum_g.data();
        for (int64_t t = 0; t < n; ++t) {
            const T* xt = x + t * channels + c0;
            const T* gt = grad + t * channels + c0;
            T* dxt = grad_x + t * channels + c0;
#pragma omp simd
            for (int64_t j = 0; j < w; ++j) {
                const A d = (A(xt[j]) - mu0[j]) - dr[j];
                const A inv_k = 1 / std::sqrt(vr[j] + e);
                const A y = d * inv_k;
                const A g_out = gt[j];  // loaded unconditionally: a select vectorizes, a conditional load does not
                // No gradient where the forward clamp cut (z rounded to T exactly as forward stored it).
                const A gz = std::fabs(T(y * gm[j] + of[j])) <= T(limit) ? g_out : A(0);
                sgy[j] += gz * y;
                sg[j] += gz;
                const A g_ctrl = gz * gm[j] - cb * vv[j] * y;  // g' = dL/dy - (1-ab) v y
                vv[j] += g_ctrl * y;
                const A dx = g_ctrl * inv_k - cb * uu[j];
                uu[j] += dx;
                dxt[j] = T(dx);
                vr[j] = a * vr[j] + ab * (d * d);
                dr[j] += b * d;
            }
        }
        for (int64_t j = 0; j < w; ++j) {
            u_io[c0 + j] = T(uu[j]);
            v_io[c0 + j] = T(vv[j]);
            grad_weight[c0 + j] = T(sgy[j]);
            grad_bias[c0 + j] = T(sg[j]);
        }
    });
}

}  // namespace

#define ONORM_EXPORT(T, SUFFIX)                                                                                      \
    extern "C" void onorm_dense_forward_##SUFFIX(const T* x, T* z, int64_t n, int64_t c, const T* mean0,              \
                                                 const T* var0, const T* gamma, const T* beta, double alpha_fwd,      \
                                                 double eps, double limit, T* mean_out, T* var_out, int threads) {    \
        forward(x, z, n, c, mean0, var0, gamma, beta, alpha_fwd, eps, limit, mean_out, var_out, threads);             \
    }                                                                                                                 \
    extern "C" void onorm_dense_backward_##SUFFIX(const T* grad, const T* x, T* grad_x, int64_t n, int64_t c,         \
                                                  const T* mean0, const T* var0, const T* gamma, const T* beta,       \
                                                  double alpha_fwd, double alpha_bkw, double eps, double limit,       \
                                                  T* u_io, T* v_io, T* grad_weight, T* grad_bias, int threads) {      \
        backward(grad, x, grad_x, n, c, mean0, var0, gamma, beta, alpha_fwd, alpha_bkw, eps, limit, u_io, v_io,      \
                 grad_weight, grad_bias, threads);                                                                    \
    }

ONORM_EXPORT(float, f32)
ONORM_EXPORT(double, f64)
