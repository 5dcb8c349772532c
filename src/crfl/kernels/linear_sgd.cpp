// Local SGD of the logistic model (Eq. 24): one client's tau local steps in one call.
//
// Step s of client k:  W <- W - eta * sum_j a_j (softmax(W x_j + b) - e_{y_j}) x_j^T,  b likewise,
// with a_j = 1 / (valid samples in the batch), inputs x_j = xs_j * inv in storage units xs_j (0..255
// pixels). The operations are those of the torch path (crfl.local.linear_local_updates_torch), so that
// docs/theory.md (g) step 7's rounding bound covers both:
//   logits    z_j = fl(b + sum_i (W*inv)[c, i] xs_j[i])   (weights scaled first; the sum in any order, A2)
//   softmax   e = exp(z - max z) (exp_inplace: on AVX-512 in vectors, within 2.7 u; libm elsewhere), S = sum_c e_c,
//             G[j, c] = e_c * (a_j / S) - a_j [c == y_j]
//   update    W[c, i] <- W[c, i] + alpha * sum_j G[j, c] xs_j[i],  alpha = -eta * inv;  b[c] -= eta sum_j G[j, c]
// The sums over i (logits) and over j (update) run as 8 or 16 lane-wise partial sums added at the end:
// a reordering of the sum, which assumption (A2) allows. Multiply-adds may be contracted (one rounding).
// Padded slots (index -1) have a_j = 0 and are skipped (the torch path multiplies them by 0).
//
// Layout: W is class-major (C x d, as the flat parameters store it), copied once per client into a
// buffer padded to dp (a multiple of the vector length) with zero columns, which no step changes. Each
// batch's rows are gathered once into a buffer X (n_B x dp, zero-padded) that stays in L2: for uint8
// pixels on an AVX-512 CPU X holds the pixels as stored (78 KB for the paper's batch) and both passes
// zero-extend and convert each vector of 8 (float64) or 16 (float32) pixels in registers as they load it
// (exact: every 0..255 is a float); otherwise X holds the rows converted once to T. There is no float
// copy of the batch to write and read back: per vector of pixels, two conversion instructions feed ten
// multiply-adds. The logits take a block of RB rows x CB classes of vector partial sums (registers), the
// pixels in equal chunks; the update a block of CB classes x IV vectors of pixels, looping over the
// batch, and writes the next step's scaled weights Ws = W * inv with the block it updated. The next
// step's rows are prefetched into L2 a row per block of the logits (spread out: a burst of 1300 cache
// lines would wait on the core's line fill buffers). Single-threaded: the caller splits the clients
// over threads (crfl.kernels.parallel_for); a client's result does not depend on the split.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

template <class T> struct Vec;
template <> struct Vec<double> { typedef double type __attribute__((vector_size(64))); static constexpr int L = 8; };
template <> struct Vec<float> { typedef float type __attribute__((vector_size(64))); static constexpr int L = 16; };

constexpr int RB = 2;     // rows per block of the logits
constexpr int CBMAX = 10; // classes per block (RB x CBMAX and CBMAX x IV accumulators fit the 32 registers)
constexpr int IV = 2;     // vectors of pixels per block of the update
constexpr int64_t IC_BYTES = 3200;  // at most this many bytes of a row per chunk of the logits: CBMAX rows of Ws in L1

template <class S>
inline void prefetch_row(const S* xs, int64_t row, int64_t d) {  // a storage row into L2 (a hint only)
    if (row < 0) return;
    const char* p = reinterpret_cast<const char*>(xs + row * d);
    for (int64_t o = 0; o < d * (int64_t)sizeof(S); o += 64) __builtin_prefetch(p + o, 0, 2);
}

template <class T>
inline typename Vec<T>::type bcast(T s) {  // s in every lane (s - 0 is s exactly: one broadcast)
    return s - typename Vec<T>::type{};
}

// One vector of T from L elements of E at p: a plain load when E is T; uint8 pixels zero-extended
// and converted in registers (exact: every 0..255 is a float) when E is uint8 (AVX-512 only, see Batch).
template <class T, class E>
inline typename Vec<T>::type load_as(const E* p) {
    using V = typename Vec<T>::type;
    if constexpr (std::is_same_v<E, T>) {
        return *reinterpret_cast<const V*>(p);
    } else {
#if defined(__AVX512F__)
        static_assert(std::is_same_v<E, uint8_t>, "only uint8 pixels are converted in registers");
        if constexpr (std::is_same_v<T, double>) {  // 8 pixels
#if defined(__AVX512DQ__)
            return (V)_mm512_cvtepi64_pd(_mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i*)p)));
#else
            return (V)_mm512_cvtepi32_pd(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#endif
        } else {  // 16 pixels
            return (V)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
        }
#else
        static_assert(std::is_same_v<E, T>, "conversion in registers needs AVX-512");
#endif
    }
}

template <class T>
inline T hsum(typename Vec<T>::type v) {  // the lanes' partial sums, added pairwise
    constexpr int L = Vec<T>::L;
    T s[L];
    std::memcpy(s, &v, sizeof s);
    for (int w = L / 2; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) s[l] += s[l + w];
    return s[0];
}

// Lane-wise partial sums P[j, c] (one vector each) of X[j] . Ws[c] over the pixels [i0, i1), rows
// j0..j0+R, classes c0..c0+CB: started from zero at the first chunk, kept in P between chunks (so that
// a chunk of Ws stays in L1 across all rows), and at the last chunk added up into Z = b + sum.
template <class T, class E, int R, int CB>
void logits_block(const E* X, const T* Ws, const T* b, T* Z, typename Vec<T>::type* P, int64_t dp, int64_t C,
                  int64_t j0, int64_t c0, int64_t i0, int64_t i1) {
    using V = typename Vec<T>::type;
    constexpr int L = Vec<T>::L;
    V acc[R][CB];
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
        for (int c = 0; c < CB; ++c) acc[r][c] = i0 == 0 ? V{} : P[(j0 + r) * C + c0 + c];
    for (int64_t i = i0; i < i1; i += L) {
        V x[R];
#pragma GCC unroll 32
        for (int r = 0; r < R; ++r) x[r] = load_as<T>(X + (j0 + r) * dp + i);
#pragma GCC unroll 32
        for (int c = 0; c < CB; ++c) {
            const V w = *reinterpret_cast<const V*>(Ws + (c0 + c) * dp + i);
#pragma GCC unroll 32
            for (int r = 0; r < R; ++r) acc[r][c] += x[r] * w;
        }
    }
    if (i1 < dp) {
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < CB; ++c) P[(j0 + r) * C + c0 + c] = acc[r][c];
    } else {
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < CB; ++c) Z[(j0 + r) * C + c0 + c] = b[c0 + c] + hsum<T>(acc[r][c]);
    }
}

// W[c0..c0+CB), pixel vectors v0..v0+NV) += alpha * sum_j G[j, c] X[j], and the scaled weights Ws = W * inv
// of the same block for the next step's logits (written here: no separate pass over W)
template <class T, class E, int CB, int NV>
void update_block(const E* X, const T* G, T* W, T* Ws, T alpha, T inv, int64_t n, int64_t dp, int64_t C, int64_t i0,
                  int64_t c0) {
    using V = typename Vec<T>::type;
    constexpr int L = Vec<T>::L;
    V acc[CB][NV];
#pragma GCC unroll 32
    for (int c = 0; c < CB; ++c)
#pragma GCC unroll 32
        for (int v = 0; v < NV; ++v) acc[c][v] = V{};
    for (int64_t j = 0; j < n; ++j) {
        V x[NV];
#pragma GCC unroll 32
        for (int v = 0; v < NV; ++v) x[v] = load_as<T>(X + j * dp + i0 + v * L);
#pragma GCC unroll 32
        for (int c = 0; c < CB; ++c) {
            const V g = bcast<T>(G[j * C + c0 + c]);
#pragma GCC unroll 32
            for (int v = 0; v < NV; ++v) acc[c][v] += g * x[v];
        }
    }
    const V a = bcast<T>(alpha), s = bcast<T>(inv);
    for (int c = 0; c < CB; ++c)
        for (int v = 0; v < NV; ++v) {
            V* w = reinterpret_cast<V*>(W + (c0 + c) * dp + i0 + v * L);
            const V updated = *w + a * acc[c][v];
            *w = updated;
            *reinterpret_cast<V*>(Ws + (c0 + c) * dp + i0 + v * L) = updated * s;
        }
}

// dispatch a runtime class count cb in 1..CBMAX to the template instance
template <class T, class E, int R, int CB = CBMAX>
void logits_cb(int cb, const E* X, const T* Ws, const T* b, T* Z, typename Vec<T>::type* P, int64_t dp, int64_t C,
               int64_t j0, int64_t c0, int64_t i0, int64_t i1) {
    if constexpr (CB >= 1) {
        if (cb == CB) return logits_block<T, E, R, CB>(X, Ws, b, Z, P, dp, C, j0, c0, i0, i1);
        logits_cb<T, E, R, CB - 1>(cb, X, Ws, b, Z, P, dp, C, j0, c0, i0, i1);
    }
}
template <class T, class E, int NV, int CB = CBMAX>
void update_cb(int cb, const E* X, const T* G, T* W, T* Ws, T alpha, T inv, int64_t n, int64_t dp, int64_t C, int64_t i0,
               int64_t c0) {
    if constexpr (CB >= 1) {
        if (cb == CB) return update_block<T, E, CB, NV>(X, G, W, Ws, alpha, inv, n, dp, C, i0, c0);
        update_cb<T, E, NV, CB - 1>(cb, X, G, W, Ws, alpha, inv, n, dp, C, i0, c0);
    }
}

// e^x for each x[0..n) in place, for the softmax's shifted logits x = z - max z <= 0. A vector whose
// lanes are all in [XMIN, 0] (normal results) takes the routine below, proved within 2.7 u of e^x
// (relative; u = 2^-53 float64, 2^-24 float32), inside docs/theory.md (g) step 7's (A3), EXP_ULPS = 4 u;
// any other vector (a lane underflowing, -inf, NaN) and the tail take the C library's exp.
//   k = round(fl(x log2 e)): |x - k ln 2| <= (1/2 + 2u |x| log2 e) ln 2 < 0.3466 =: rho;
//   r = fl(fl(x - k C1) - k C2), C1 = fl(ln 2), C2 = fl(ln 2 - C1), two multiply-adds (one rounding
//       each): |r - (x - k ln 2)| <= 2 u rho + |k| |ln 2 - C1 - C2| < 0.70 u;
//   e^r = 1 + r + r^2 q(r), q(r) = sum_{m>=2} r^(m-2) / m!, evaluated to m = M (13 float64, 7 float32)
//       by Horner in multiply-adds with coefficients fl(1/m!) (m! exact): the truncation is
//       <= rho^(M+1) / (M+1)! (1.03) < 0.13 u e^r; the error e_m of the step for q_m obeys
//       e_m <= u (1/m! + |q_m|) + rho e_(m+1) (c_2 = 1/2 exact), hence e_2 < 0.75 u; with
//       s = fl(r^2): |s q^ - r^2 q| <= rho^2 (0.75 + 0.57) u < 0.16 u; t = fl(r + s q^): u |t| <= 0.42 u;
//       y = fl(1 + t): u |y|; y 2^k exact (VSCALEF; the results are normal).
//   Relative to e^r >= 0.7071: 0.70 u + (0.16 + 0.42) u / 0.7071 + 0.13 u + u < 2.7 u (second-order
//       terms included). tests/test_linear_sgd_kernel.py measures it against long double.
#if defined(__AVX512F__)
inline __m512d vexp(__m512d x) {
    constexpr int M = 13;
    const __m512d k = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(1.4426950408889634)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512d r = _mm512_fnmadd_pd(k, _mm512_set1_pd(0.6931471805599453), x);  // C1 = 0x1.62e42fefa39efp-1
    r = _mm512_fnmadd_pd(k, _mm512_set1_pd(2.3190468138462996e-17), r);      // C2
    double fact = 1;
    for (int m = 2; m <= M; ++m) fact *= m;  // M!
    __m512d q = _mm512_set1_pd(1 / fact);
    for (int m = M - 1; m >= 2; --m) {
        fact /= m + 1;  // m!, exact
        q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(1 / fact));
    }
    const __m512d t = _mm512_fmadd_pd(_mm512_mul_pd(r, r), q, r);
    return _mm512_scalef_pd(_mm512_add_pd(_mm512_set1_pd(1.0), t), k);
}
inline __m512 vexp(__m512 x) {
    constexpr int M = 7;
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693147182f), x);  // C1 = 0x1.62e430p-1
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-1.90465430e-09f), r);     // C2
    float fact = 1;
    for (int m = 2; m <= M; ++m) fact *= m;
    __m512 q = _mm512_set1_ps(1 / fact);
    for (int m = M - 1; m >= 2; --m) {
        fact /= m + 1;
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1 / fact));
    }
    const __m512 t = _mm512_fmadd_ps(_mm512_mul_ps(r, r), q, r);
    return _mm512_scalef_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), t), k);
}
template <class T> struct Reg;  // the intrinsics' vector type
template <> struct Reg<double> { typedef __m512d type; };
template <> struct Reg<float> { typedef __m512 type; };
inline bool in_range(__m512d x) {  // every lane in [-707, 0]: e^x >= 2^-1020, normal (false for NaN)
    return (_mm512_cmp_pd_mask(x, _mm512_set1_pd(-707.0), _CMP_GE_OQ) & _mm512_cmp_pd_mask(x, _mm512_setzero_pd(), _CMP_LE_OQ)) == 0xFF;
}
inline bool in_range(__m512 x) {  // every lane in [-86, 0]: e^x >= 2^-124
    return (_mm512_cmp_ps_mask(x, _mm512_set1_ps(-86.0f), _CMP_GE_OQ) & _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LE_OQ)) == 0xFFFF;
}
#endif

template <class T>
void exp_inplace(T* x, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    constexpr int L = Vec<T>::L;
    for (; i + L <= n; i += L) {
        typename Reg<T>::type v;
        std::memcpy(&v, x + i, sizeof v);
        if (in_range(v)) {
            v = vexp(v);
            std::memcpy(x + i, &v, sizeof v);
        } else {
            for (int l = 0; l < L; ++l) x[i + l] = std::exp(x[i + l]);
        }
    }
#endif
    for (; i < n; ++i) x[i] = std::exp(x[i]);
}

// dst[0..d) = src[0..d) as T: exact from uint8 (and from float32 to float64), rounded to nearest otherwise
template <class T, class S>
inline void convert(T* dst, const S* src, int64_t d) {
    int64_t i = 0;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<S, uint8_t> && std::is_same_v<T, double>) {  // 8 pixels: zero-extend, convert
        for (; i + 8 <= d; i += 8)
            _mm512_store_pd(dst + i, _mm512_cvtepi32_pd(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(src + i)))));
    } else if constexpr (std::is_same_v<S, uint8_t> && std::is_same_v<T, float>) {  // 16 pixels
        for (; i + 16 <= d; i += 16)
            _mm512_store_ps(dst + i, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(src + i)))));
    }
#endif
#pragma omp simd
    for (int64_t j = i; j < d; ++j) dst[j] = (T)src[j];
}

template <class T>
T* aligned(int64_t count) {  // zero-filled, 64-byte aligned
    size_t bytes = ((size_t)count * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes ? bytes : 64);
    if (p) std::memset(p, 0, bytes ? bytes : 64);
    return static_cast<T*>(p);
}

// Clients k_lo..k_hi: idx (K, tau, n_B) storage rows (-1 padded), start of client k at
// starts + k * start_stride (flat W (C x d) then b (C)), updates w_tau - w_0 written to out (K, D).
template <class T, class S>
int linear_sgd(const S* xs, const int64_t* y, const int64_t* idx, const T* starts, int64_t start_stride, T* out,
               int64_t k_lo, int64_t k_hi, int64_t tau, int64_t n_B, int64_t d, int64_t C, double lr, double inv) {
    constexpr int L = Vec<T>::L;
    const int64_t dp = (d + L - 1) / L * L, D = C * d + C;
    // the batch buffer: uint8 pixels as stored (converted in registers by both passes) where the CPU
    // has AVX-512, else the converted rows
#if defined(__AVX512F__)
    using E = std::conditional_t<std::is_same_v<S, uint8_t>, uint8_t, T>;
#else
    using E = T;
#endif
    E* X = aligned<E>(n_B * dp);
    T* W = aligned<T>(C * dp);
    T* Ws = aligned<T>(C * dp);
    T* b = aligned<T>(C);
    T* Z = aligned<T>(n_B * C);
    using V = typename Vec<T>::type;
    V* P = aligned<V>(n_B * C);
    // the pixels in equal chunks of at most IC_BYTES of a row (whole vectors): a short last chunk would
    // pay a block's set-up (its partial sums saved and reloaded) for a few vectors of work
    const int64_t nchunks = (dp * (int64_t)sizeof(T) + IC_BYTES - 1) / IC_BYTES;
    const int64_t ic = (dp / L + nchunks - 1) / nchunks * L;
    int64_t* lab = aligned<int64_t>(n_B);
    int status = (X && W && Ws && b && Z && P && lab) ? 0 : 1;
    const T invT = (T)inv, alpha = (T)(-lr * inv), eta = (T)lr;
    for (int64_t k = k_lo; k < k_hi && status == 0; ++k) {
        const T* w0 = starts + k * start_stride;
        for (int64_t c = 0; c < C; ++c) std::memcpy(W + c * dp, w0 + c * d, d * sizeof(T));
        std::memcpy(b, w0 + C * d, C * sizeof(T));
        // the logits' weights scaled first (as the torch path and theory (g) step 7 do): Ws = W * inv,
        // here for the first step, then by each step's update (W * 1 is W exactly when inv is 1)
        for (int64_t q = 0; q < C * dp; ++q) Ws[q] = W[q] * invT;
        for (int64_t s = 0; s < tau; ++s) {
            const int64_t* rows = idx + (k * tau + s) * n_B;
            int64_t n = 0;  // the batch's valid samples, gathered and converted once
            for (int64_t j = 0; j < n_B; ++j) {
                if (rows[j] < 0) continue;
                const S* src = xs + rows[j] * d;
                if constexpr (std::is_same_v<E, S>) std::memcpy(X + n * dp, src, d * sizeof(S));
                else convert(X + n * dp, src, d);
                lab[n++] = y[rows[j]];
            }
            if (n == 0) continue;  // an empty step changes nothing
            const T a = T(1) / T(n);
            const int64_t* next = s + 1 < tau ? rows + n_B : nullptr;
            // the next step's rows into L2 while this step computes, spread over the logits' blocks (a burst
            // of them would wait on the core's line fill buffers)
            int64_t pf = next ? 0 : n_B;
            const int64_t blocks = (C + CBMAX - 1) / CBMAX * nchunks * ((n + RB - 1) / RB);
            const int64_t per = (n_B + blocks - 1) / blocks;
            for (int64_t c0 = 0; c0 < C; c0 += CBMAX) {
                const int cb = (int)std::min<int64_t>(CBMAX, C - c0);
                for (int64_t i0 = 0; i0 < dp; i0 += ic) {
                    const int64_t i1 = std::min(dp, i0 + ic);
                    int64_t j = 0;
                    for (; j < n; j += RB) {
                        for (int64_t q = 0; q < per && pf < n_B; ++q) prefetch_row(xs, next[pf++], d);
                        if (j + RB <= n) logits_cb<T, E, RB>(cb, X, Ws, b, Z, P, dp, C, j, c0, i0, i1);
                        else for (int64_t jj = j; jj < n; ++jj) logits_cb<T, E, 1>(cb, X, Ws, b, Z, P, dp, C, jj, c0, i0, i1);
                    }
                }
            }
            while (pf < n_B) prefetch_row(xs, next[pf++], d);
            // G = a softmax(z) - a e_y, in place of Z
            for (int64_t j = 0; j < n; ++j) {  // the shift z - max z
                T* z = Z + j * C;
                T m = z[0];
                for (int64_t c = 1; c < C; ++c) m = std::max(m, z[c]);
                for (int64_t c = 0; c < C; ++c) z[c] = z[c] - m;
            }
            exp_inplace(Z, n * C);  // all the batch's exponentials at once (vectors of 8 or 16)
            for (int64_t j = 0; j < n; ++j) {
                T* z = Z + j * C;
                T sum = 0;
                for (int64_t c = 0; c < C; ++c) sum += z[c];
                const T f = a / sum;
                for (int64_t c = 0; c < C; ++c) z[c] = z[c] * f;
                z[lab[j]] -= a;
            }
            // the update, the gradient product fused into it; the bias
            for (int64_t c0 = 0; c0 < C; c0 += CBMAX) {
                const int cb = (int)std::min<int64_t>(CBMAX, C - c0);
                int64_t i = 0;
                for (; i + IV * L <= dp; i += IV * L) update_cb<T, E, IV>(cb, X, Z, W, Ws, alpha, invT, n, dp, C, i, c0);
                for (; i < dp; i += L) update_cb<T, E, 1>(cb, X, Z, W, Ws, alpha, invT, n, dp, C, i, c0);
            }
            for (int64_t c = 0; c < C; ++c) {
                T g = 0;
                for (int64_t j = 0; j < n; ++j) g += Z[j * C + c];
                b[c] = b[c] - eta * g;
            }
        }
        T* o = out + k * D;
        for (int64_t c = 0; c < C; ++c)
            for (int64_t i = 0; i < d; ++i) o[c * d + i] = W[c * dp + i] - w0[c * d + i];
        for (int64_t c = 0; c < C; ++c) o[C * d + c] = b[c] - w0[C * d + c];
    }
    std::free(X); std::free(W); std::free(Ws); std::free(b); std::free(Z); std::free(P); std::free(lab);
    return status;
}

}  // namespace

#define CRFL_LINEAR_SGD(NAME, T, S)                                                                              \
    extern "C" int NAME(const S* xs, const int64_t* y, const int64_t* idx, const T* starts, int64_t start_stride, \
                        T* out, int64_t k_lo, int64_t k_hi, int64_t tau, int64_t n_B, int64_t d, int64_t C,      \
                        double lr, double inv) {                                                                  \
        return linear_sgd<T, S>(xs, y, idx, starts, start_stride, out, k_lo, k_hi, tau, n_B, d, C, lr, inv);    \
    }

CRFL_LINEAR_SGD(linear_sgd_float64_uint8, double, uint8_t)
CRFL_LINEAR_SGD(linear_sgd_float64_float32, double, float)
CRFL_LINEAR_SGD(linear_sgd_float64_float64, double, double)
CRFL_LINEAR_SGD(linear_sgd_float32_uint8, float, uint8_t)
CRFL_LINEAR_SGD(linear_sgd_float32_float32, float, float)
CRFL_LINEAR_SGD(linear_sgd_float32_float64, float, double)

// the softmax's exp as the kernel computes it (tests measure its error)
extern "C" void linear_sgd_exp_float64(double* x, int64_t n) { exp_inplace(x, n); }
extern "C" void linear_sgd_exp_float32(float* x, int64_t n) { exp_inplace(x, n); }
