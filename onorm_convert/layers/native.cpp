// Online Normalization training passes as native code: the whole forward, or the whole
// backward, of one batch in one pass over the activations.
//
// The samples of a batch are a stream, so each channel walks t = 0..N-1 in order (channels
// are independent and spread over the threads), its recurrent state held in float64. This is
// a sequential scan per channel, as torch.cumsum is on CPU. Backward recomputes the forward
// state from the state before the batch instead of reading saved per-sample tensors, so a
// training step stores nothing of the activations' size besides the input. With projection="batch" backward
// takes the input gradient in a second pass, once the whole batch's sums are known (batch_projection).
//
// - dense (N, C): one value per sample and channel; a block of channels advances together,
//   the channel loop innermost (contiguous, vectorized).
// - spatial (N, C, S), contiguous: sample t's channel c is one row of S values, read from
//   memory once per pass while it fits in cache (its mean, variance and output re-read it).
// - channels_last (N, S, C): a block of channels per thread, vectorized across channels;
//   each sample's slice is read once for its moments and once for the output.
//
// The equations are those of shared/docs/online-norm.md in the form functional.py uses: the
// mean carried as its drift from mean0, so data at the stream's mean gives exactly y = 0.
// Built by native.py with -ffp-contract=off: forward and backward must evaluate z identically
// (the clamp mask is recomputed in backward), vectorized body and tail alike.
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Channel blocks [c0, c1) spread over the threads; each block walks the whole stream. A block's
// state (a few doubles per channel) stays in L1 cache; its rows are whole cache lines.
constexpr int64_t kDenseBlock = 256;

template <typename F>
void for_channel_blocks(int64_t channels, int64_t width, int threads, F body) {
    const int64_t blocks = (channels + width - 1) / width;
    const int team = blocks < threads ? int(blocks) : threads;  // no thread woken without a block
#pragma omp parallel for num_threads(team) schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
        const int64_t c0 = block * width;
        body(c0, c0 + width < channels ? c0 + width : channels);
    }
}

// channels_last: one block of whole cache lines per thread, so each position's slice is contiguous.
inline int64_t channels_last_width(int64_t channels, int threads) {
    const int64_t share = (channels + threads - 1) / threads;
    return (share + 15) / 16 * 16;
}

using A = double;  // the arithmetic and the recurrent state, whatever the activations' dtype

template <typename T>
inline T clamp_to(T v, T limit) {  // NaN stays NaN, as torch.clamp
    return v > limit ? limit : (v < -limit ? -limit : v);
}

// v after one sample, from v_prev, mean(g y) and (1-ab) mean(y^2): the doc's explicit step
// v_prev + mean(g' y), or (stable) its implicit form, whose decay 1 / (1 + (1-ab) mean(y^2)) stays in (0, 1].
inline A next_v(A v_prev, A mean_gy, A cb_mean_y2, int stable) {
    return stable ? (v_prev + mean_gy) / (1 + cb_mean_y2) : v_prev * (1 - cb_mean_y2) + mean_gy;
}

// project (projection="batch", which ops.py gives a batch of two or more): the input gradient is gz * grad - (x - mean(x)) * along_x - mean_grad,
// BatchNorm's projection of the gradient with the statistics held constant (functional.batch_projection, whose
// equations these are). One channel, from its n samples' values `stride` apart: the sums over the `count` positions
// of gz and gz * (x - center), the gradient coefficient, the mean and biased variance (nullptr: 0), and the
// center, the means and centers measured from the same origin.
struct Projection {
    A along_x, batch_mean, mean_grad;
    A constant(A center) const { return -mean_grad - along_x * (center - batch_mean); }  // with xc = x - center
};

inline Projection batch_projection(const A* sum_gz, const A* sum_gz_xc, const A* grad, const A* m, const A* s,
                                   const A* center, int64_t n, int64_t stride, A count, A eps) {
    A sum_m = 0;
    for (int64_t t = 0; t < n; ++t) sum_m += m[t * stride];
    const A batch_mean = sum_m / A(n);
    A spread = 0, sum_g = 0, sum_gx = 0;
    for (int64_t t = 0; t < n; ++t) {
        const int64_t i = t * stride;
        const A dm = m[i] - batch_mean;
        spread += (s == nullptr ? 0 : s[i]) + dm * dm;
        sum_g += grad[i] * sum_gz[i];
        sum_gx += grad[i] * (sum_gz_xc[i] + (center[i] - batch_mean) * sum_gz[i]);
    }
    const A total = A(n) * count;
    return {sum_gx / total / (spread / A(n) + eps), batch_mean, sum_g / total};
}

// The dense forward stream: per block of channels, each sample t in order calls visit(i, c, d, inv_k, mu_prev) for
// its value i = t * C + c, with d = x - mu_prev and 1 / k before the sample; then the state advances, and the state
// after the batch goes to mean_out, var_out. The training forward and the traced step's statistics both walk it.
template <typename T, typename Visit>
void dense_stream(const T* x, int64_t n, int64_t channels, const T* mean0, const T* var0, double alpha_fwd, double eps,
                  T* mean_out, T* var_out, int threads, Visit visit) {
    const A a = alpha_fwd, b = 1 - alpha_fwd, ab = alpha_fwd * (1 - alpha_fwd), e = eps;
    for_channel_blocks(channels, kDenseBlock, threads, [&](int64_t c0, int64_t c1) {
        const int64_t w = c1 - c0;
        std::vector<A> drift(w, 0.0), var(var0 + c0, var0 + c1), m0(mean0 + c0, mean0 + c1);
        A *dr = drift.data(), *vr = var.data(), *mu0 = m0.data();
        for (int64_t t = 0; t < n; ++t) {
            const int64_t at = t * channels + c0;
#pragma omp simd
            for (int64_t j = 0; j < w; ++j) {
                const A d = (A(x[at + j]) - mu0[j]) - dr[j];
                visit(at + j, c0 + j, d, 1 / std::sqrt(vr[j] + e), mu0[j] + dr[j]);
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
void dense_forward(const T* x, T* z, int64_t n, int64_t channels, const T* mean0, const T* var0, const T* gamma,
             const T* beta, double alpha_fwd, double eps, double limit, T* mean_out, T* var_out, int threads) {
    dense_stream(x, n, channels, mean0, var0, alpha_fwd, eps, mean_out, var_out, threads,
                 [&](int64_t i, int64_t c, A d, A inv_k, A) {
                     z[i] = clamp_to(T(d * inv_k * A(gamma[c]) + A(beta[c])), T(limit));
                 });
}

template <typename T>
void dense_backward(const T* grad, const T* x, T* grad_x, int64_t n, int64_t channels, const T* mean0, const T* var0,
              const T* gamma, const T* beta, double alpha_fwd, double alpha_bkw, double eps, double limit, int stable,
              int project, T* u_io, T* v_io, T* grad_weight, T* grad_bias, int threads) {
    const A a = alpha_fwd, b = 1 - alpha_fwd, ab = alpha_fwd * (1 - alpha_fwd), e = eps, cb = 1 - alpha_bkw;
    for_channel_blocks(channels, kDenseBlock, threads, [&](int64_t c0, int64_t c1) {
        const int64_t w = c1 - c0;
        // projection: per sample and channel what batch_projection takes (a sample's one value is its mean, with
        // variance 0), and x - center; the means and centers as their drift from mean0.
        const size_t kept = project ? size_t(n * w) : 0;
        std::vector<A> gz_of(kept), gz_xc(kept), coef(kept), m_rel(kept), centers(kept), xc_of(kept);
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
                vv[j] = next_v(vv[j], gz * gm[j] * y, cb * (y * y), stable);
                const A dx = g_ctrl * inv_k - cb * uu[j];
                uu[j] += dx;
                if (!project) {
                    dxt[j] = T(dx);
                } else {  // the input gradient once the batch is known, below
                    const int64_t i = t * w + j;
                    gz_of[i] = gz;
                    gz_xc[i] = gz * d;
                    coef[i] = gm[j] * inv_k;
                    m_rel[i] = dr[j] + d;
                    centers[i] = dr[j];
                    xc_of[i] = d;
                }
                vr[j] = a * vr[j] + ab * (d * d);
                dr[j] += b * d;
            }
        }
        for (int64_t j = 0; project && j < w; ++j) {
            const Projection pr = batch_projection(gz_of.data() + j, gz_xc.data() + j, coef.data() + j,
                                                   m_rel.data() + j, nullptr, centers.data() + j, n, w, 1, e);
            for (int64_t t = 0; t < n; ++t) {
                const int64_t i = t * w + j;
                grad_x[t * channels + c0 + j] = T(gz_of[i] * coef[i] - xc_of[i] * pr.along_x + pr.constant(centers[i]));
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


// Mean and biased variance of a row, two passes (exact centering), summed in float64. Forward
// and backward call it on the same row and get the same bits.
template <typename T>
inline void row_moments(const T* row, int64_t count, A& mean, A& var) {
    A sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < count; ++p) sum += A(row[p]);
    mean = sum / A(count);
    A squares = 0;
#pragma omp simd reduction(+ : squares)
    for (int64_t p = 0; p < count; ++p) {
        const A centered = A(row[p]) - mean;
        squares += centered * centered;
    }
    var = squares / A(count);
}

// The doc's backward control for one sample of one channel, from the sums over its `count` positions
// of gz (the gradient the clamp let through) and gz * (x - mu_prev): v and u advance by the means of
// g' y and dL/dx, the parameter gradients accumulate, and the result is the input gradient's
// coefficients, dL/dx = gz * grad + (x - mu_prev) * xc + constant.
template <typename T>
struct InputGrad {
    T grad, xc, constant;
};

template <typename T>
inline InputGrad<T> control_step(A sum_gz, A sum_gz_xc, A s, A d, A inv_k, A gamma, A count, A keep, A cb,
                                 int stable, A& u, A& v, A& sum_gy, A& sum_g) {
    const A mean_gz_y = sum_gz_xc * inv_k / count, mean_y2 = (s + d * d) * inv_k * inv_k;
    const A v_prev = v, u_prev = u;
    v = next_v(v_prev, mean_gz_y * gamma, cb * mean_y2, stable);
    u = keep * u_prev + (sum_gz * gamma / count - cb * v_prev * d * inv_k) * inv_k;
    sum_gy += sum_gz_xc * inv_k;
    sum_g += sum_gz;
    // dL/dx = gz gamma / k - (1-ab) v_prev (x - mu_prev) / k^2 - (1-ab) u_prev
    return {T(gamma * inv_k), T(-cb * v_prev * inv_k * inv_k), T(-cb * u_prev)};
}

// One channel of a spatial kernel: the doc's constants, its parameters, and its recurrent state
// while the kernel walks the stream.
template <typename T>
struct RowChannel {
    A a, b, ab, e, keep, cb;  // alpha_fwd, 1 - alpha_fwd, their product, eps, alpha_bkw, 1 - alpha_bkw
    int stable = 0;  // how v advances (next_v)
    T m0, beta, lim;
    A gamma, drift = 0, var, u = 0, v = 0, sum_gy = 0, sum_g = 0;

    RowChannel(double alpha_fwd, double alpha_bkw, double eps, double limit, T mean0, A var0, A gamma_, T beta_)
        : a(alpha_fwd), b(1 - alpha_fwd), ab(alpha_fwd * (1 - alpha_fwd)), e(eps), keep(alpha_bkw),
          cb(1 - alpha_bkw), m0(mean0), beta(beta_), lim(T(limit)), gamma(gamma_), var(var0) {}

    // One sample's row of `count` values: its moments, and the affine map before the clamp. x - mu_prev
    // is one float subtraction from mu_prev rounded once: as exact as the data allows however far the
    // stream has drifted from m0, and exactly 0 for data at m0 while it has not drifted.
    struct Step {
        A m, s, d, inv_k;
        T center, scale;
    };
    Step step(const T* row, int64_t count) const {
        Step st;
        row_moments(row, count, st.m, st.s);
        st.d = (st.m - A(m0)) - drift;
        st.inv_k = 1 / std::sqrt(var + e);
        st.center = T(A(m0) + drift);
        st.scale = T(st.inv_k * gamma);
        return st;
    }
    void advance(const Step& st) {
        var = a * var + b * st.s + ab * (st.d * st.d);
        drift += b * st.d;
    }

    void forward(const T* row, T* out, int64_t count) {
        const Step st = step(row, count);
        const T center = st.center, scale = st.scale, offset = beta, limit = lim;
#pragma omp simd
        for (int64_t p = 0; p < count; ++p) out[p] = clamp_to((row[p] - center) * scale + offset, limit);
        advance(st);
    }

    // One sample's backward up to its input gradient: the forward's statistics recomputed (the same clamp
    // mask), the sums of gz (the gradient where the clamp let it through) and gz * (x - mu_prev), and the
    // control step, which advances u, v and the parameter gradients. The statistics are not advanced yet.
    struct Sums {
        Step st;
        A sum_gz, sum_gz_xc;
        InputGrad<T> coef;
    };
    Sums sums(const T* row, const T* grow, int64_t count) {
        const Step st = step(row, count);
        const T center = st.center, scale = st.scale, offset = beta, limit = lim;
        A sum_gz = 0, sum_gz_xc = 0;
#pragma omp simd reduction(+ : sum_gz, sum_gz_xc)
        for (int64_t p = 0; p < count; ++p) {
            const T xc = row[p] - center, g_out = grow[p];
            const T gz = std::fabs(xc * scale + offset) <= limit ? g_out : T(0);
            sum_gz += A(gz);
            sum_gz_xc += A(gz) * A(xc);
        }
        const InputGrad<T> coef = control_step<T>(sum_gz, sum_gz_xc, st.s, st.d, st.inv_k, gamma, A(count), keep,
                                                  cb, stable, u, v, sum_gy, sum_g);
        return {st, sum_gz, sum_gz_xc, coef};
    }
    void input_grad(const T* row, const T* grow, T* dxrow, int64_t count, const Step& st, InputGrad<T> coef) const {
        const T center = st.center, scale = st.scale, offset = beta, limit = lim;
        const T grad_coef = coef.grad, xc_coef = coef.xc, constant = coef.constant;
#pragma omp simd
        for (int64_t p = 0; p < count; ++p) {
            const T xc = row[p] - center, g_out = grow[p];
            const T gz = std::fabs(xc * scale + offset) <= limit ? g_out : T(0);
            dxrow[p] = gz * grad_coef + xc * xc_coef + constant;
        }
    }
    void backward(const T* row, const T* grow, T* dxrow, int64_t count) {
        const Sums sm = sums(row, grow, count);
        input_grad(row, grow, dxrow, count, sm.st, sm.coef);
        advance(sm.st);
    }
};

template <typename T>
void spatial_forward(const T* x, T* z, int64_t n, int64_t channels, int64_t positions, const T* mean0,
                     const T* var0, const T* gamma, const T* beta, double alpha_fwd, double eps, double limit,
                     T* mean_out, T* var_out, int threads) {
    const int team = channels < threads ? int(channels) : threads;
#pragma omp parallel for num_threads(team) schedule(static)
    for (int64_t c = 0; c < channels; ++c) {
        RowChannel<T> ch(alpha_fwd, 0, eps, limit, mean0[c], var0[c], gamma[c], beta[c]);
        for (int64_t t = 0; t < n; ++t) {
            const int64_t at = (t * channels + c) * positions;  // sample t, channel c
            ch.forward(x + at, z + at, positions);
        }
        mean_out[c] = T(A(ch.m0) + ch.drift);
        var_out[c] = T(ch.var);
    }
}

template <typename T>
void spatial_backward(const T* grad, const T* x, T* grad_x, int64_t n, int64_t channels, int64_t positions,
                      const T* mean0, const T* var0, const T* gamma, const T* beta, double alpha_fwd,
                      double alpha_bkw, double eps, double limit, int stable, int project, T* u_io, T* v_io,
                      T* grad_weight, T* grad_bias, int threads) {
    const int team = channels < threads ? int(channels) : threads;
#pragma omp parallel for num_threads(team) schedule(static)
    for (int64_t c = 0; c < channels; ++c) {
        RowChannel<T> ch(alpha_fwd, alpha_bkw, eps, limit, mean0[c], var0[c], gamma[c], beta[c]);
        ch.stable = stable;
        ch.u = u_io[c];
        ch.v = v_io[c];
        if (project) {  // every sample's sums first; the input gradient once the batch's projection is known
            using Step = typename RowChannel<T>::Step;
            std::vector<Step> steps(n);
            std::vector<A> sum_gz(n), sum_gz_xc(n), coef(n), m_rel(n), s(n), centers(n);
            for (int64_t t = 0; t < n; ++t) {
                const int64_t at = (t * channels + c) * positions;  // sample t, channel c
                centers[t] = ch.drift;  // the means and centers as their drift from mean0
                const auto sm = ch.sums(x + at, grad + at, positions);
                steps[t] = sm.st;
                sum_gz[t] = sm.sum_gz;
                sum_gz_xc[t] = sm.sum_gz_xc;
                coef[t] = ch.gamma * sm.st.inv_k;
                m_rel[t] = ch.drift + sm.st.d;
                s[t] = sm.st.s;
                ch.advance(sm.st);
            }
            const Projection pr = batch_projection(sum_gz.data(), sum_gz_xc.data(), coef.data(), m_rel.data(),
                                                   s.data(), centers.data(), n, 1, A(positions), A(eps));
            for (int64_t t = 0; t < n; ++t) {
                const int64_t at = (t * channels + c) * positions;
                const InputGrad<T> projected{T(coef[t]), T(-pr.along_x), T(pr.constant(centers[t]))};
                ch.input_grad(x + at, grad + at, grad_x + at, positions, steps[t], projected);
            }
        } else {
            for (int64_t t = 0; t < n; ++t) {
                const int64_t at = (t * channels + c) * positions;  // sample t, channel c
                ch.backward(x + at, grad + at, grad_x + at, positions);
            }
        }
        u_io[c] = T(ch.u);
        v_io[c] = T(ch.v);
        grad_weight[c] = T(ch.sum_gy);
        grad_bias[c] = T(ch.sum_g);
    }
}



// channels_last (N, S, C): a sample's positions are rows of C channels. A block of channels per
// thread walks the stream, vectorized across its channels as the dense kernel; per sample it reads
// the block's slice of every position row once for the moments (one pass, shifted by mean0) and
// once more for the output (twice more backward).
template <typename T>
struct ColumnBlock {
    int64_t c0, w;
    A a, b, ab, e, keep, cb;
    T lim;
    std::vector<A> drift, var, u, v, sum_gy, sum_g, s1, s2, d, inv_k, m, sv;
    std::vector<T> m0, beta, gamma, center, scale;

    ColumnBlock(int64_t c0_, int64_t c1, const T* mean0, const T* var0, const T* gamma_, const T* beta_,
                double alpha_fwd, double alpha_bkw, double eps, double limit)
        : c0(c0_), w(c1 - c0_), a(alpha_fwd), b(1 - alpha_fwd), ab(alpha_fwd * (1 - alpha_fwd)), e(eps),
          keep(alpha_bkw), cb(1 - alpha_bkw), lim(T(limit)), drift(w, 0.0), var(var0 + c0, var0 + c1), u(w, 0.0),
          v(w, 0.0), sum_gy(w, 0.0), sum_g(w, 0.0), s1(w), s2(w), d(w), inv_k(w), m(w), sv(w),
          m0(mean0 + c0, mean0 + c1), beta(beta_ + c0, beta_ + c1), gamma(gamma_ + c0, gamma_ + c1), center(w),
          scale(w) {}

    // One sample (its slab starts at xt, rows `stride` apart): per channel the mean and biased variance
    // in one pass, summed in float64 around the sample's own first position (within its spread of the
    // mean, so E[r^2] - E[r]^2 does not cancel; a constant channel gives exactly 0), and the affine map
    // before the clamp, exactly as forward and backward both need it.
    void step(const T* xt, int64_t positions, int64_t stride) {
        A *p1 = s1.data(), *p2 = s2.data();
        const T* first = xt;
        for (int64_t j = 0; j < w; ++j) p1[j] = p2[j] = 0;
        for (int64_t p = 0; p < positions; ++p) {
            const T* row = xt + p * stride;
#pragma omp simd
            for (int64_t j = 0; j < w; ++j) {
                const A rel = A(row[j]) - A(first[j]);
                p1[j] += rel;
                p2[j] += rel * rel;
            }
        }
        for (int64_t j = 0; j < w; ++j) {
            const A rel_mean = s1[j] / A(positions), spread = s2[j] / A(positions) - rel_mean * rel_mean;
            sv[j] = spread < 0 ? 0 : spread;  // rounding may leave a tiny negative; NaN stays NaN
            d[j] = (rel_mean + (A(first[j]) - A(m0[j]))) - drift[j];  // exactly 0 for data at an undrifted mean0
            inv_k[j] = 1 / std::sqrt(var[j] + e);
            center[j] = T(A(m0[j]) + drift[j]);
            scale[j] = T(inv_k[j] * A(gamma[j]));
        }
    }
    void advance() {
        for (int64_t j = 0; j < w; ++j) {
            var[j] = a * var[j] + b * sv[j] + ab * (d[j] * d[j]);
            drift[j] += b * d[j];
        }
    }
};

template <typename T>
void channels_last_forward(const T* x, T* z, int64_t n, int64_t channels, int64_t positions, const T* mean0,
                           const T* var0, const T* gamma, const T* beta, double alpha_fwd, double eps, double limit,
                           T* mean_out, T* var_out, int threads) {
    for_channel_blocks(channels, channels_last_width(channels, threads), threads, [&](int64_t c0, int64_t c1) {
        ColumnBlock<T> blk(c0, c1, mean0, var0, gamma, beta, alpha_fwd, 0, eps, limit);
        const int64_t w = blk.w;
        const T *cn = blk.center.data(), *sc = blk.scale.data(), *o = blk.beta.data(), lim = blk.lim;
        for (int64_t t = 0; t < n; ++t) {
            const int64_t sample = t * positions * channels + c0;
            blk.step(x + sample, positions, channels);
            for (int64_t p = 0; p < positions; ++p) {
                const T* row = x + sample + p * channels;
                T* out = z + sample + p * channels;
#pragma omp simd
                for (int64_t j = 0; j < w; ++j) out[j] = clamp_to((row[j] - cn[j]) * sc[j] + o[j], lim);
            }
            blk.advance();
        }
        for (int64_t j = 0; j < w; ++j) {
            mean_out[c0 + j] = T(A(blk.m0[j]) + blk.drift[j]);
            var_out[c0 + j] = T(blk.var[j]);
        }
    });
}

template <typename T>
void channels_last_backward(const T* grad, const T* x, T* grad_x, int64_t n, int64_t channels, int64_t positions,
                            const T* mean0, const T* var0, const T* gamma, const T* beta, double alpha_fwd,
                            double alpha_bkw, double eps, double limit, int stable, int project, T* u_io, T* v_io,
                            T* grad_weight, T* grad_bias, int threads) {
    for_channel_blocks(channels, channels_last_width(channels, threads), threads, [&](int64_t c0, int64_t c1) {
        ColumnBlock<T> blk(c0, c1, mean0, var0, gamma, beta, alpha_fwd, alpha_bkw, eps, limit);
        const int64_t w = blk.w;
        for (int64_t j = 0; j < w; ++j) {
            blk.u[j] = u_io[c0 + j];
            blk.v[j] = v_io[c0 + j];
        }
        std::vector<A> sum_gz(w), sum_gz_xc(w);
        std::vector<T> grad_coef(w), xc_coef(w), constant(w);
        const T *cn = blk.center.data(), *sc = blk.scale.data(), *o = blk.beta.data(), lim = blk.lim;
        A *sgz = sum_gz.data(), *sgzx = sum_gz_xc.data();
        const T *gc = grad_coef.data(), *xcc = xc_coef.data(), *cs = constant.data();
        const A count = A(positions);
        // dL/dx of one sample: gz * gc + (x - center) * xcc + cs, with the z map (center, scale) its forward used.
        auto input_grad = [&](int64_t sample, const T* center, const T* scale) {
            for (int64_t p = 0; p < positions; ++p) {
                const T *row = x + sample + p * channels, *grow = grad + sample + p * channels;
                T* dxrow = grad_x + sample + p * channels;
#pragma omp simd
                for (int64_t j = 0; j < w; ++j) {
                    const T xc = row[j] - center[j], g_out = grow[j];
                    const T gz = std::fabs(xc * scale[j] + o[j]) <= lim ? g_out : T(0);
                    dxrow[j] = gz * gc[j] + xc * xcc[j] + cs[j];
                }
            }
        };
        // projection: per sample and channel (t * w + j) what batch_projection takes, and the z map's center and
        // scale for the input gradient's pass once the batch's projection is known.
        const size_t kept = project ? size_t(n * w) : 0;
        std::vector<A> p_gz(kept), p_gz_xc(kept), p_coef(kept), p_m(kept), p_s(kept), p_center(kept);
        std::vector<T> p_cn(kept), p_sc(kept);
        for (int64_t t = 0; t < n; ++t) {
            const int64_t sample = t * positions * channels + c0;
            blk.step(x + sample, positions, channels);  // the forward's statistics, recomputed: the same mask
            for (int64_t j = 0; j < w; ++j) sgz[j] = sgzx[j] = 0;
            for (int64_t p = 0; p < positions; ++p) {
                const T *row = x + sample + p * channels, *grow = grad + sample + p * channels;
#pragma omp simd
                for (int64_t j = 0; j < w; ++j) {
                    const T xc = row[j] - cn[j], g_out = grow[j];
                    const T gz = std::fabs(xc * sc[j] + o[j]) <= lim ? g_out : T(0);
                    sgz[j] += A(gz);
                    sgzx[j] += A(gz) * A(xc);
                }
            }
            for (int64_t j = 0; j < w; ++j) {
                const InputGrad<T> coef = control_step<T>(sgz[j], sgzx[j], blk.sv[j], blk.d[j], blk.inv_k[j],
                                                          A(blk.gamma[j]), count, blk.keep, blk.cb, stable,
                                                          blk.u[j], blk.v[j], blk.sum_gy[j], blk.sum_g[j]);
                grad_coef[j] = coef.grad;
                xc_coef[j] = coef.xc;
                constant[j] = coef.constant;
            }
            if (project) {
                for (int64_t j = 0; j < w; ++j) {
                    const int64_t i = t * w + j;
                    p_gz[i] = sgz[j];
                    p_gz_xc[i] = sgzx[j];
                    p_coef[i] = A(blk.gamma[j]) * blk.inv_k[j];
                    p_m[i] = blk.drift[j] + blk.d[j];  // the means and centers as their drift from mean0
                    p_s[i] = blk.sv[j];
                    p_center[i] = blk.drift[j];
                    p_cn[i] = cn[j];
                    p_sc[i] = sc[j];
                }
            } else {
                input_grad(sample, cn, sc);
            }
            blk.advance();
        }
        if (project) {
            std::vector<Projection> pr(w);
            for (int64_t j = 0; j < w; ++j)
                pr[j] = batch_projection(p_gz.data() + j, p_gz_xc.data() + j, p_coef.data() + j, p_m.data() + j,
                                         p_s.data() + j, p_center.data() + j, n, w, count, A(eps));
            for (int64_t j = 0; j < w; ++j) xc_coef[j] = T(-pr[j].along_x);
            for (int64_t t = 0; t < n; ++t) {
                for (int64_t j = 0; j < w; ++j) {
                    grad_coef[j] = T(p_coef[t * w + j]);
                    constant[j] = T(pr[j].constant(p_center[t * w + j]));
                }
                input_grad(t * positions * channels + c0, p_cn.data() + t * w, p_sc.data() + t * w);
            }
        }
        for (int64_t j = 0; j < w; ++j) {
            u_io[c0 + j] = T(blk.u[j]);
            v_io[c0 + j] = T(blk.v[j]);
            grad_weight[c0 + j] = T(blk.sum_gy[j]);
            grad_bias[c0 + j] = T(blk.sum_g[j]);
        }
    });
}

// The traced step (ops.py, under torch.compile): the forward's per-sample statistics alone, which the compiled graph
// turns into z itself, and the backward's control alone, from the sums of g = gamma * gz that the graph takes.
// Per sample t and channel c (index t * C + c): the center mu_prev, 1 / k, d = m - mu_prev and the biased variance s.
template <typename T>
void dense_statistics(const T* x, int64_t n, int64_t channels, const T* mean0, const T* var0, double alpha_fwd,
                      double eps, T* center, T* inv_k, T* d_out, T* s_out, T* mean_out, T* var_out, int threads) {
    dense_stream(x, n, channels, mean0, var0, alpha_fwd, eps, mean_out, var_out, threads,
                 [&](int64_t i, int64_t, A d, A ik, A mu_prev) {
                     center[i] = T(mu_prev);
                     inv_k[i] = T(ik);
                     d_out[i] = T(d);
                     s_out[i] = T(0);  // a sample's one value: variance 0
                 });
}

template <typename T>
void spatial_statistics(const T* x, int64_t n, int64_t channels, int64_t positions, const T* mean0, const T* var0,
                        double alpha_fwd, double eps, T* center, T* inv_k, T* d_out, T* s_out, T* mean_out,
                        T* var_out, int threads) {
    const int team = channels < threads ? int(channels) : threads;
#pragma omp parallel for num_threads(team) schedule(static)
    for (int64_t c = 0; c < channels; ++c) {
        RowChannel<T> ch(alpha_fwd, 0, eps, 0, mean0[c], var0[c], 1, 0);
        for (int64_t t = 0; t < n; ++t) {
            const auto st = ch.step(x + (t * channels + c) * positions, positions);
            const int64_t i = t * channels + c;
            center[i] = st.center;
            inv_k[i] = T(st.inv_k);
            d_out[i] = T(st.d);
            s_out[i] = T(st.s);
            ch.advance(st);
        }
        mean_out[c] = T(A(ch.m0) + ch.drift);
        var_out[c] = T(ch.var);
    }
}

template <typename T>
void channels_last_statistics(const T* x, int64_t n, int64_t channels, int64_t positions, const T* mean0,
                              const T* var0, double alpha_fwd, double eps, T* center, T* inv_k, T* d_out, T* s_out,
                              T* mean_out, T* var_out, int threads) {
    const std::vector<T> ones(channels, T(1));  // gamma and beta, unused: the blocks' statistics only
    for_channel_blocks(channels, channels_last_width(channels, threads), threads, [&](int64_t c0, int64_t c1) {
        ColumnBlock<T> blk(c0, c1, mean0, var0, ones.data(), ones.data(), alpha_fwd, 0, eps, 0);
        for (int64_t t = 0; t < n; ++t) {
            blk.step(x + t * positions * channels + c0, positions, channels);
            for (int64_t j = 0; j < blk.w; ++j) {
                const int64_t i = t * channels + c0 + j;
                center[i] = blk.center[j];
                inv_k[i] = T(blk.inv_k[j]);
                d_out[i] = T(blk.d[j]);
                s_out[i] = T(blk.sv[j]);
            }
            blk.advance();
        }
        for (int64_t j = 0; j < blk.w; ++j) {
            mean_out[c0 + j] = T(A(blk.m0[j]) + blk.drift[j]);
            var_out[c0 + j] = T(blk.var[j]);
        }
    });
}

// The control alone, for (N, C) per-sample sums of g and g * (x - mu_prev) over `count` positions (gamma folded
// into g): u, v advance, and dL/dx = g / k + (x - mu_prev) * xc_coef + constant (the first term the graph's own).
// project: the coefficients of batch_projection's gradient instead (u, v advance as the doc's either way).
template <typename T>
void control(const T* sum_g, const T* sum_g_xc, const T* center, const T* inv_k, const T* d, const T* s, int64_t n,
             int64_t channels, double count, double alpha_bkw, double eps, int stable, int project, T* u_io, T* v_io,
             T* xc_coef, T* constant, int threads) {
    const A keep = alpha_bkw, cb = 1 - alpha_bkw;
    for_channel_blocks(channels, kDenseBlock, threads, [&](int64_t c0, int64_t c1) {
        // projection: one channel's samples as batch_projection reads them, contiguous.
        std::vector<A> g(project ? n : 0), g_xc(g.size()), coef(g.size()), m(g.size()), sv(g.size()), cn(g.size());
        for (int64_t c = c0; c < c1; ++c) {
            A u = u_io[c], v = v_io[c], unused_gy = 0, unused_g = 0;
            for (int64_t t = 0; t < n; ++t) {
                const int64_t i = t * channels + c;
                const InputGrad<T> coefs = control_step<T>(sum_g[i], sum_g_xc[i], s[i], d[i], inv_k[i], 1, count,
                                                           keep, cb, stable, u, v, unused_gy, unused_g);
                xc_coef[i] = coefs.xc;
                constant[i] = coefs.constant;
                if (project) {
                    g[t] = sum_g[i], g_xc[t] = sum_g_xc[i], coef[t] = inv_k[i];
                    cn[t] = center[i], m[t] = A(center[i]) + A(d[i]), sv[t] = s[i];
                }
            }
            if (project) {
                const Projection pr = batch_projection(g.data(), g_xc.data(), coef.data(), m.data(), sv.data(),
                                                       cn.data(), n, 1, count, eps);
                for (int64_t t = 0; t < n; ++t) {
                    xc_coef[t * channels + c] = T(-pr.along_x);
                    constant[t * channels + c] = T(pr.constant(cn[t]));
                }
            }
            u_io[c] = T(u);
            v_io[c] = T(v);
        }
    });
}

}  // namespace

#define ONORM_EXPORT(T, SUFFIX)                                                                                      \
    extern "C" void onorm_dense_forward_##SUFFIX(const T* x, T* z, int64_t n, int64_t c, const T* mean0,              \
                                                 const T* var0, const T* gamma, const T* beta, double alpha_fwd,      \
                                                 double eps, double limit, T* mean_out, T* var_out, int threads) {    \
        dense_forward(x, z, n, c, mean0, var0, gamma, beta, alpha_fwd, eps, limit, mean_out, var_out, threads);             \
    }                                                                                                                 \
    extern "C" void onorm_dense_backward_##SUFFIX(const T* grad, const T* x, T* grad_x, int64_t n, int64_t c,         \
                                                  const T* mean0, const T* var0, const T* gamma, const T* beta,       \
                                                  double alpha_fwd, double alpha_bkw, double eps, double limit,       \
                                                  int stable, int project, T* u_io, T* v_io, T* grad_weight,          \
                                                  T* grad_bias, int threads) {                                        \
        dense_backward(grad, x, grad_x, n, c, mean0, var0, gamma, beta, alpha_fwd, alpha_bkw, eps, limit, stable,          \
                       project, u_io, v_io, grad_weight, grad_bias, threads);                                         \
    }

// The spatial and channels_last kernels share one signature: sizes (N, C, S) of the batch.
#define ONORM_EXPORT_ROWS(T, SUFFIX, LAYOUT)                                                                          \
    extern "C" void onorm_##LAYOUT##_forward_##SUFFIX(                                                                \
        const T* x, T* z, int64_t n, int64_t c, int64_t s, const T* mean0, const T* var0, const T* gamma,             \
        const T* beta, double alpha_fwd, double eps, double limit, T* mean_out, T* var_out, int threads) {            \
        LAYOUT##_forward(x, z, n, c, s, mean0, var0, gamma, beta, alpha_fwd, eps, limit, mean_out, var_out, threads); \
    }                                                                                                                 \
    extern "C" void onorm_##LAYOUT##_backward_##SUFFIX(                                                               \
        const T* grad, const T* x, T* grad_x, int64_t n, int64_t c, int64_t s, const T* mean0, const T* var0,         \
        const T* gamma, const T* beta, double alpha_fwd, double alpha_bkw, double eps, double limit, int stable,      \
        int project, T* u_io, T* v_io, T* grad_weight, T* grad_bias, int threads) {                                   \
        LAYOUT##_backward(grad, x, grad_x, n, c, s, mean0, var0, gamma, beta, alpha_fwd, alpha_bkw, eps, limit,       \
                          stable, project, u_io, v_io, grad_weight, grad_bias, threads);                              \
    }

ONORM_EXPORT(float, f32)
ONORM_EXPORT(double, f64)
ONORM_EXPORT_ROWS(float, f32, spatial)
ONORM_EXPORT_ROWS(double, f64, spatial)
ONORM_EXPORT_ROWS(float, f32, channels_last)
ONORM_EXPORT_ROWS(double, f64, channels_last)

#define ONORM_EXPORT_TRACED(T, SUFFIX)                                                                                \
    extern "C" void onorm_dense_statistics_##SUFFIX(const T* x, int64_t n, int64_t c, const T* mean0, const T* var0, \
                                                    double alpha_fwd, double eps, T* center, T* inv_k, T* d, T* s,   \
                                                    T* mean_out, T* var_out, int threads) {                          \
        dense_statistics(x, n, c, mean0, var0, alpha_fwd, eps, center, inv_k, d, s, mean_out, var_out, threads);    \
    }                                                                                                                 \
    extern "C" void onorm_spatial_statistics_##SUFFIX(const T* x, int64_t n, int64_t c, int64_t p, const T* mean0,   \
                                                      const T* var0, double alpha_fwd, double eps, T* center,        \
                                                      T* inv_k, T* d, T* s, T* mean_out, T* var_out, int threads) {  \
        spatial_statistics(x, n, c, p, mean0, var0, alpha_fwd, eps, center, inv_k, d, s, mean_out, var_out,         \
                           threads);                                                                                  \
    }                                                                                                                 \
    extern "C" void onorm_channels_last_statistics_##SUFFIX(                                                          \
        const T* x, int64_t n, int64_t c, int64_t p, const T* mean0, const T* var0, double alpha_fwd, double eps,     \
        T* center, T* inv_k, T* d, T* s, T* mean_out, T* var_out, int threads) {                                      \
        channels_last_statistics(x, n, c, p, mean0, var0, alpha_fwd, eps, center, inv_k, d, s, mean_out, var_out,   \
                                 threads);                                                                            \
    }                                                                                                                 \
    extern "C" void onorm_control_##SUFFIX(const T* sum_g, const T* sum_g_xc, const T* center, const T* inv_k,      \
                                           const T* d, const T* s, int64_t n, int64_t c, double count,               \
                                           double alpha_bkw, double eps, int stable, int project, T* u_io, T* v_io,  \
                                           T* xc_coef, T* constant, int threads) {                                   \
        control(sum_g, sum_g_xc, center, inv_k, d, s, n, c, count, alpha_bkw, eps, stable, project, u_io, v_io,     \
                xc_coef, constant, threads);                                                                          \
    }

ONORM_EXPORT_TRACED(float, f32)
ONORM_EXPORT_TRACED(double, f64)
