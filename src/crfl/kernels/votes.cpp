// crfl-kernel-flags: -ffp-contract=off
// Monte Carlo votes (crfl.smoothing, Algorithm 2's GetCounts): the argmax of every noisy model's
// logits on every point, added into the counts in one pass over a block of logits.
//
// Layout: logit of point p < n, model j < m, class c < C at L[p * sp + j * sj + c * sc]; counts
// (n, C) int64, row-major. The argmax is torch's: the lowest index among equal maxima, and a NaN
// counts as the maximum (the first NaN wins). With sj == 1 (class-major: for each point and class
// the m models' logits are contiguous, as crfl.smoothing's linear path lays out its product) the
// loops run over models in SIMD lanes with contiguous loads; any other layout (the module path's
// (n, m, C) logits) takes one model at a time. Single-threaded; crfl.kernels.parallel_for splits
// the points over threads (each thread owns its points' rows of the counts).
//
// votes_mixed_f32 (docs/theory.md (c), "Float32 logits, exact votes"): the logits are float32
// products of the float32-rounded float64 noisy models; a vote is taken from them only when the
// computed top-two gap exceeds the proven bound on twice a logit's rounding error (then it is the
// exact-arithmetic vote of the noisy model w + sigma e). Otherwise the logits of the classes that can
// still be the exact argmax are recomputed in float64 and the same test is made with float64's bound;
// the pairs that fail both are handed back for exact (integer) arithmetic. No -ffast-math: comparisons
// are IEEE. The caller makes sure no float32 logit can overflow (so none is NaN or infinite).
//
// -ffp-contract=off (first line): no a * b + c is contracted into a fused multiply-add, so the noisy weights
// formed here are fl(w + fl(sigma e)), the same floats as torch's W + sigma * E. (An FMA would be one rounding,
// also inside the proven bounds; this is about using the very floats the float32 operands were rounded from.)

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>


namespace {

constexpr int64_t LANES = 256;  // models per SIMD pass (class-major layout; measured best of 16-256)

// torch.argmax over C values at stride sc: lowest index on ties, first NaN wins.
template <typename T>
inline int64_t argmax(const T* v, int64_t C, int64_t sc) {
    T best = v[0];
    int64_t bi = 0;
    for (int64_t c = 1; c < C; ++c) {
        const T x = v[c * sc];
        if (best == best && (x > best || x != x)) {  // best not NaN, and x larger or NaN
            best = x;
            bi = c;
        }
    }
    return bi;
}

// Per model j < k of a class-major block v (class c of model j at v[j + c * sc]): the top value
// (strict > over classes in order: the lowest index among equals), its index, the runner-up value
// (equal to the top when the top is tied) and, with CHECK, whether all C values are finite.
template <bool CHECK, typename T>
inline void top_two(const T* v, int64_t k, int64_t C, int64_t sc, T* top, int32_t* idx, T* second, int32_t* ok) {
    constexpr T big = std::numeric_limits<T>::max();
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) {
        top[j] = v[j];
        idx[j] = 0;
        second[j] = -INFINITY;
        if (CHECK) ok[j] = std::fabs(v[j]) <= big;  // false for a NaN or an infinity
    }
    for (int64_t c = 1; c < C; ++c) {
        const T* row = v + c * sc;
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) {
            const T x = row[j];
            const T t = top[j], s = second[j];
            const bool gt = x > t;
            if (CHECK) ok[j] &= std::fabs(x) <= big;
            // the runner-up: the old top when x beats it, else the larger of x and the runner-up, i.e.
            // max(s, min(x, t)) for numbers (a NaN lane is recounted by the caller, model by model)
            const T lo = x < t ? x : t;
            second[j] = s > lo ? s : lo;
            idx[j] = gt ? (int32_t)c : idx[j];
            top[j] = gt ? x : t;
        }
    }
}

// The float32 top two of the class-major block as top_two<false>, 8 models at a time in GCC vector registers (the
// top, the runner-up and the index stay in registers over the classes; compilers do not vectorise this loop order
// from the scalar code). The last 8 lanes overlap the previous ones where k is not a multiple of 8 (the same
// lanes computed twice, the same results). k >= 8.
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

inline void top_two_x8(const float* v, int64_t k, int64_t C, int64_t sc, float* top, int32_t* idx, float* second) {
    for (int64_t j0 = 0; j0 < k; j0 += 8) {
        const int64_t j = j0 + 8 <= k ? j0 : k - 8;
        f32x8 t, s, x;
        std::memcpy(&t, v + j, sizeof t);
        s = t - INFINITY;  // -inf in every lane (t is finite)
        i32x8 id = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t c = 1; c < C; ++c) {
            std::memcpy(&x, v + j + c * sc, sizeof x);
            const i32x8 gt = x > t;  // -1 where x beats the top (strict: the lowest index among equals stays)
            const f32x8 lo = x < t ? x : t;
            s = s > lo ? s : lo;  // the runner-up: max(s, min(x, t))
            id = gt ? (i32x8){0, 0, 0, 0, 0, 0, 0, 0} + (int32_t)c : id;
            t = gt ? x : t;
        }
        std::memcpy(top + j, &t, sizeof t);
        std::memcpy(second + j, &s, sizeof s);
        std::memcpy(idx + j, &id, sizeof id);
    }
}

// cnt[c] += #{j < k : take[j] and idx[j] == c}, one vectorised count per class; one add where all k are taken
// and agree (a unanimous point, the common case at small sigma_T).
inline void histogram(const int32_t* idx, const int32_t* take, int64_t k, int64_t C, int64_t* cnt) {
    int32_t lo = idx[0], hi = idx[0], all = 1;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(& : all)
    for (int64_t j = 0; j < k; ++j) {
        lo = idx[j] < lo ? idx[j] : lo;
        hi = idx[j] > hi ? idx[j] : hi;
        all &= take[j] != 0;
    }
    if (lo == hi && all) {
        cnt[lo] += k;
        return;
    }
    for (int64_t c = lo; c <= hi; ++c) {  // only the classes that occur among the idx
        int32_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < k; ++j) s += take[j] & (idx[j] == c);
        cnt[c] += s;
    }
}

template <typename T>
void votes(const T* L, int64_t n, int64_t m, int64_t C, int64_t sp, int64_t sj, int64_t sc, int64_t* counts) {
    T top[LANES], second[LANES];
    int32_t idx[LANES], ok[LANES];
    for (int64_t p = 0; p < n; ++p) {
        const T* v = L + p * sp;
        int64_t* cnt = counts + p * C;
        if (sj != 1) {  // one model at a time
            for (int64_t j = 0; j < m; ++j) cnt[argmax(v + j * sj, C, sc)] += 1;
            continue;
        }
        for (int64_t j0 = 0; j0 < m; j0 += LANES) {
            const int64_t k = m - j0 < LANES ? m - j0 : LANES;
            top_two<true>(v + j0, k, C, sc, top, idx, second, ok);
            histogram(idx, ok, k, C, cnt);
            for (int64_t j = 0; j < k; ++j)  // a NaN or infinity among the logits: torch's rule, model by model
                if (!ok[j]) cnt[argmax(v + j0 + j, C, sc)] += 1;
        }
    }
}

// One float64 noisy logit formed on the fly: sum_i fl(w_i + fl(sigma e_i)) x_i + bias over d features, the noisy
// weights being the floats prep_mixed_f32 rounds to float32 (any summation order: the float64 bound covers it).
inline double noisy_dot64(const double* w, const double* e, double sigma, const double* x, int64_t d, double bias) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < d; ++i) s += (w[i] + sigma * e[i]) * x[i];
    return s + bias;
}

}  // namespace

extern "C" {

// counts[p, argmax_c L[p, j, c]] += 1 for every point p < n and model j < m.
void votes_f64(const double* L, int64_t n, int64_t m, int64_t C, int64_t sp, int64_t sj, int64_t sc, int64_t* counts) {
    votes(L, n, m, C, sp, sj, sc, counts);
}

void votes_f32(const float* L, int64_t n, int64_t m, int64_t C, int64_t sp, int64_t sj, int64_t sc, int64_t* counts) {
    votes(L, n, m, C, sp, sj, sc, counts);
}

// The points' side of the mixed votes, points [p0, p1) of X (n, d) float64 in one pass (crfl.kernels.parallel_for
// splits the points over threads): X32 (n, d + 1) = [fl32(X), 1] (the products' operand, the bias's feature
// last), px[p] = sqrt(sum_i x_i^2 + 1) = ||[x; 1]||
// (crfl.exact_votes.logit_error_scales; the rounding of the sum is covered by the threshold's safety factor),
// nnz[p] = #{i : x_i != 0} (the terms that carry roundings) and bad[p] = 1 if some nonzero |x_i| is outside
// [FLT_MIN, 1e37] or NaN (its float32 cast is then not within a relative u), else 0.
void scan_points(const double* X, int64_t p0, int64_t p1, int64_t d, float* X32, double* px, int64_t* nnz,
                 int32_t* bad) {
    for (int64_t p = p0; p < p1; ++p) {
        const double* x = X + p * d;
        float* y = X32 + p * (d + 1);
        double ss = 0.0;
        int64_t k = 0;
        int32_t out_of_range = 0;
#pragma omp simd reduction(+ : ss, k) reduction(| : out_of_range)
        for (int64_t i = 0; i < d; ++i) {
            const double v = x[i], a = std::fabs(v);
            ss += v * v;
            k += v != 0.0;
            out_of_range |= (!(a <= 1e37)) | ((a < FLT_MIN) & (a > 0.0));
            y[i] = (float)v;
        }
        y[d] = 1.0f;
        px[p] = std::sqrt(ss + 1.0);
        nnz[p] = k;
        bad[p] = out_of_range;
    }
}

// The preparation of a chunk of m noisy models for votes_mixed_f32, models [j0, j1) (one pass over their noise
// rows; crfl.kernels.parallel_for splits the models over threads). E: (m, C d + C) float64 N(0, 1) noise in the flat
// layout (row j: the class-major weights' noise, then the biases'); W: (C, d), b: (C,) float64; w_norm[c] =
// ||[w_c; b_c]||. Writes, for each model j and class c, with wn = fl(w + fl(sigma e)) (float64, as torch's
// W + sigma * E):
//   Wcm[(c m + j) (d + 1) + i] = fl32(wn_ci), i < d, and fl32(bn_c) at i = d  (the class-major float32 operand,
//                                                                             the bias last, as X32's 1)
//   pm[j]    = max_c (w_norm[c] + sigma sqrt(sum_i e_ci^2 + e_bc^2))    (crfl.exact_votes.logit_error_scales)
//   e_min[j] = the smallest nonzero |e| of the row (inf if none)         (sigma e_min >= 2 DBL_MIN: no underflow)
//   bad[j]   = 1 if some nonzero |wn| or |bn| is outside [FLT_MIN, 1e37] or NaN (its float32 cast is then not
//              within a relative u), else 0.
void prep_mixed_f32(const double* E, int64_t m, int64_t j0, int64_t j1, const double* W, const double* b,
                    const double* w_norm, int64_t C, int64_t d, double sigma, float* Wcm, double* pm,
                    double* e_min, int32_t* bad) {
    const int64_t D = C * d + C;
    for (int64_t j = j0; j < j1; ++j) {
        const double* e = E + j * D;
        double worst = 0.0, emin = INFINITY;
        int32_t out_of_range = 0;
        for (int64_t c = 0; c < C; ++c) {
            const double* ec = e + c * d;
            const double* wc = W + c * d;
            float* dst = Wcm + (c * m + j) * (d + 1);
            double ss = 0.0;
#pragma omp simd reduction(+ : ss) reduction(min : emin) reduction(| : out_of_range)
            for (int64_t i = 0; i < d; ++i) {
                const double ei = ec[i], wn = wc[i] + sigma * ei, a = std::fabs(wn), ae = std::fabs(ei);
                ss += ei * ei;
                emin = ae > 0.0 && ae < emin ? ae : emin;
                out_of_range |= (!(a <= 1e37)) | ((a < FLT_MIN) & (a > 0.0));
                dst[i] = (float)wn;
            }
            const double eb = e[C * d + c], bn = b[c] + sigma * eb, a = std::fabs(bn), ae = std::fabs(eb);
            emin = ae > 0.0 && ae < emin ? ae : emin;
            out_of_range |= (!(a <= 1e37)) | ((a < FLT_MIN) & (a > 0.0));
            dst[d] = (float)bn;
            const double norm = w_norm[c] + sigma * std::sqrt(ss + eb * eb);
            worst = norm > worst ? norm : worst;
        }
        pm[j] = worst;
        e_min[j] = emin;
        bad[j] = out_of_range;
    }
}

// The votes of m noisy models w + sigma e on n points from their float32 logits in the class-major layout
// (L[p * sp + c * sc + j]), first stage (docs/theory.md (c), "Float32 logits, exact votes"). A logit computed
// in float32 is within thr32_x[p] * pm[j] / 2 of the exact one (crfl.exact_votes.margin_threshold; the caller
// guarantees that no float32 logit can overflow). Where the computed top-two gap exceeds thr32_x[p] * pm[j]
// the vote is added into counts (n, C); the other pairs are not counted: their (first_point + p) * m + j go to
// pending[] and the classes that can still be the exact argmax (float32 logit within the bound of the top) to
// cand[] as a bit mask (all classes where C > 64), for recompute_f64. pending and cand hold `capacity` entries:
// points are taken while m more fit; *done gets the number of points taken (the caller calls again for the
// rest with fresh buffers). Returns the number of pending pairs written.
int64_t votes_mixed_f32(const float* L, int64_t n, int64_t m, int64_t C, int64_t sp, int64_t sc,
                        const double* thr32_x, const double* pm, int64_t* counts, int64_t first_point,
                        int64_t* pending, uint64_t* cand, int64_t capacity, int64_t* done) {
    float top[LANES], second[LANES];
    int32_t idx[LANES], sure[LANES];
    int64_t npend = 0, p = 0;
    for (; p < n && capacity - npend >= m; ++p) {
        const float* v = L + p * sp;
        int64_t* cnt = counts + p * C;
        const double t32 = thr32_x[p];
        for (int64_t j0 = 0; j0 < m; j0 += LANES) {
            const int64_t k = m - j0 < LANES ? m - j0 : LANES;
            if (k >= 8)
                top_two_x8(v + j0, k, C, sc, top, idx, second);
            else
                top_two<false>(v + j0, k, C, sc, top, idx, second, nullptr);
            // the computed gap (within one double rounding, covered by the threshold's safety factor)
            // against the bound; + 1e-30 covers the absolute error of float32 underflow
            int32_t settled = 0;
#pragma omp simd reduction(+ : settled)
            for (int64_t j = 0; j < k; ++j) {
                sure[j] = (double)top[j] - (double)second[j] > t32 * pm[j0 + j] + 1e-30;
                settled += sure[j];
            }
            histogram(idx, sure, k, C, cnt);
            for (int64_t jj = 0; jj < k && settled < k; ++jj) {  // (none pending: nothing to look for)
                if (sure[jj]) continue;
                // not settled: the classes that can be the exact argmax (the others are certainly below the top)
                const int64_t j = j0 + jj;
                const double floor = (double)top[jj] - (t32 * pm[j] + 1e-30);
                uint64_t mask = ~(uint64_t)0;
                if (C <= 64) {
                    mask = 0;
                    for (int64_t c = 0; c < C; ++c)
                        if ((double)v[c * sc + j] >= floor) mask |= (uint64_t)1 << c;
                }
                pending[npend] = (first_point + p) * m + j;
                cand[npend++] = mask;
            }
        }
    }
    *done = p;
    return npend;
}

// Second stage, for k pending pairs (point pts[i], model mods[i], candidate classes cand[i]; fastest sorted by
// model, so that a model's noise row stays in cache): the float64 logits of the candidate classes, formed on the
// fly from W (C, d), b (C,), sigma and the noise E (m, C d + C) (the floats prep_mixed_f32 rounds to float32), on
// the float64 points X (n, d). A float64 logit is within thr64_x[p] * pm[j] / 2 of the exact one; where the top
// candidate beats the next by more than thr64_x[p] * pm[j] it is the exact vote: out[i] = its class, added into
// counts (n, C) unless counts is null; else out[i] = -1 (a near tie even in float64: the caller counts the exact
// vote in integer arithmetic). Threads that call it on pairs of disjoint points may share counts.
void recompute_f64(const int64_t* pts, const int64_t* mods, const uint64_t* cand, int64_t k, const double* X,
                   const double* W, const double* b, const double* E, double sigma, int64_t C, int64_t d,
                   const double* thr64_x, const double* pm, int64_t* out, int64_t* counts) {
    const int64_t D = C * d + C;
    for (int64_t i = 0; i < k; ++i) {
        const int64_t p = pts[i], j = mods[i];
        const double* x = X + p * d;
        if (i + 1 < k)  // the next pair's point, a row from memory (its model's noise is most often this one's)
            for (int64_t o = 0; o < d; o += 8) __builtin_prefetch(X + pts[i + 1] * d + o);
        const double* e = E + j * D;
        int64_t best = -1;
        double bz = -INFINITY, sz = -INFINITY;
        for (int64_t c = 0; c < C; ++c) {
            if (c < 64 && !((cand[i] >> c) & 1)) continue;
            const double zc = noisy_dot64(W + c * d, e + c * d, sigma, x, d, b[c] + sigma * e[C * d + c]);
            if (best < 0 || zc > bz) {
                sz = bz;
                bz = zc;
                best = c;
            } else if (zc > sz) {
                sz = zc;
            }
        }
        out[i] = bz - sz > thr64_x[p] * pm[j] + 1e-300 ? best : -1;
        if (counts && out[i] >= 0) counts[p * C + best] += 1;
    }
}

}  // extern "C"
