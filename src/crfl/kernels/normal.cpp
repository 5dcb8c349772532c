// crfl-kernel-flags: -ffp-contract=off -fno-math-errno
// Counter-based N(0, 1) float64 noise for Monte Carlo certification (crfl.noise, docs/theory.md (c)).
//
// Entry i of model m's noise under key k: pair p = i / 2 is the Philox4x32-10 block of the counter
// (p mod 2^32, p / 2^32, m mod 2^32, m / 2^32) under the key (k mod 2^32, k / 2^32); its 128 bits are
// two 64-bit words w0 = x0 + 2^32 x1, w1 = x2 + 2^32 x3, two 53-bit uniforms
// u1 = ((w0 >> 11) + 1) 2^-53 in (0, 1] and u2 = (w1 >> 11) 2^-53 in [0, 1), and the Box-Muller pair
// sqrt(-2 log u1) (cos 2 pi u2, sin 2 pi u2) is entries 2p and 2p + 1. So every entry is a pure
// function of (key, model, i): any rows, in any order, on any thread, give the same bits.
//
// The log and the sin/cos are this file's own (no libm version can change a bit): range reduction
// that is exact, then fixed polynomials (truncated Taylor series, coefficients rounded from 200-bit
// values), all branch-free in 8 SIMD lanes (GCC vector extensions). crfl.noise computes the SAME
// float64 operations in the same order in numpy, so the two agree bit for bit; hence the flag on the
// first line: no contraction of a * b + c into a fused multiply-add (numpy never fuses); and sqrt without
// errno (it is never negative here), so that it is the vector instruction (IEEE, correctly rounded).

#include <cstdint>
#include <cstring>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

typedef uint64_t u64x8 __attribute__((vector_size(64)));
typedef int64_t i64x8 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));

constexpr uint64_t LO32 = 0xffffffffULL;

// a * b of the low 32 bits of a and b < 2^32 (exact in 64 bits): vpmuludq where AVX-512 is there
// (it reads only the low halves; GCC emits the slower full 64-bit product for the generic expression).
inline u64x8 mul32(u64x8 a, uint64_t b) {
#ifdef __AVX512F__
    return (u64x8)_mm512_mul_epu32((__m512i)a, _mm512_set1_epi64((long long)b));
#else
    return (a & LO32) * b;
#endif
}

// Philox4x32-10's round keys: the key (k mod 2^32, k / 2^32) bumped by the Weyl constants each round.
struct Keys {
    u64x8 k0[10], k1[10];
    explicit Keys(uint64_t key) {
        uint64_t a = key & LO32, b = key >> 32;
        for (int i = 0; i < 10; ++i) {
            k0[i] = (u64x8){} + a;
            k1[i] = (u64x8){} + b;
            a = (a + 0x9E3779B9ULL) & LO32;
            b = (b + 0xBB67AE85ULL) & LO32;
        }
    }
};

// Philox4x32-10 (Salmon et al., SC 2011): 10 rounds of two 32x32 -> 64-bit products, on G vectors of
// counters at once (a round's products wait on the previous round's: G independent chains keep the
// core busy). Each lane holds one 32-bit word in the low half of a 64-bit slot; the high halves carry
// garbage between rounds (mul32 ignores them, hi = p >> 32 is clean) and are cleared at the end.
template <int G>
inline void philox(u64x8 (&c)[4][G], const Keys& k) {
    for (int round = 0; round < 10; ++round) {
        for (int g = 0; g < G; ++g) {
            const u64x8 p0 = mul32(c[0][g], 0xD2511F53ULL);
            const u64x8 p1 = mul32(c[2][g], 0xCD9E8D57ULL);
            c[0][g] = (p1 >> 32) ^ c[1][g] ^ k.k0[round];
            c[1][g] = p1;  // lo(p1)
            c[2][g] = (p0 >> 32) ^ c[3][g] ^ k.k1[round];
            c[3][g] = p0;  // lo(p0)
        }
    }
    for (int w = 0; w < 4; ++w)
        for (int g = 0; g < G; ++g) c[w][g] &= LO32;
}

// log x for x in [2^-53, 1] (normal, positive). x = 2^e m with m in [sqrt(1/2), sqrt(2)] (exact);
// log m = 2 atanh(s), s = (m - 1) / (m + 1) written f / (2 + f), |s| <= 0.1716, by its Taylor series
// 2 s (1 + s^2/3 + ... + s^18/19) (truncation < 2^-55.2 relative, at |s| = 0.1716); log x =
// e ln2_hi + (e ln2_lo + log m)
// with e ln2_hi exact (ln2_hi has 44 bits).
inline f64x8 log_v(f64x8 x) {
    const u64x8 bits = (u64x8)x;
    i64x8 e = (i64x8)(bits >> 52) - 1023;
    f64x8 m = (f64x8)((bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL);  // [1, 2)
    const i64x8 big = m > 0x1.6a09e667f3bcdp+0;  // m > sqrt(2): halve m (exact), e + 1
    m = big ? m * 0.5 : m;
    e = big ? e + 1 : e;
    const f64x8 f = m - 1.0;  // exact (Sterbenz)
    const f64x8 s = f / (2.0 + f);
    const f64x8 z = s * s;
    f64x8 q = z * 0x1.af286bca1af28p-5 + 0x1.e1e1e1e1e1e1ep-5;  // 1/19, 1/17
    q = q * z + 0x1.1111111111111p-4;  // 1/15
    q = q * z + 0x1.3b13b13b13b14p-4;  // 1/13
    q = q * z + 0x1.745d1745d1746p-4;  // 1/11
    q = q * z + 0x1.c71c71c71c71cp-4;  // 1/9
    q = q * z + 0x1.2492492492492p-3;  // 1/7
    q = q * z + 0x1.999999999999ap-3;  // 1/5
    q = q * z + 0x1.5555555555555p-2;  // 1/3
    const f64x8 t = s * 2.0;
    const f64x8 logm = t + t * (z * q);
    const f64x8 ed = __builtin_convertvector(e, f64x8);
    return ed * 0x1.62e42fefa3800p-1 + (ed * 0x1.ef35793c76730p-45 + logm);
}

// cos and sin of 2 pi u, u = k 2^-53, k < 2^53 an integer. Exact reduction in quarter turns:
// n = nearest integer to 4u, r = 4u - n in [-1/2, 1/2) (integer arithmetic), so 2 pi u = (pi/2)(n + r);
// cos/sin (pi/2) r by Taylor polynomials in r (|(pi/2) r| <= pi/4; truncation at r = 1/2: 2^-53.8 relative
// for sin, 2^-58.3 for cos), then the quadrant n mod 4 swaps and negates them.
inline void sincos_turns_v(u64x8 k, f64x8& c, f64x8& s) {
    const u64x8 n = (k + (1ULL << 50)) >> 51;                 // 0..4
    const i64x8 rem = (i64x8)k - (i64x8)(n << 51);            // in [-2^50, 2^50)
    const f64x8 r = __builtin_convertvector(rem, f64x8) * 0x1p-51;  // exact
    const f64x8 z = r * r;
    f64x8 sp = z * -0x1.6fadb9f155744p-31 + 0x1.e8f434d018d63p-25;
    sp = sp * z + -0x1.e3074fde8871fp-19;
    sp = sp * z + 0x1.50783487ee782p-13;
    sp = sp * z + -0x1.32d2cce62bd86p-8;
    sp = sp * z + 0x1.466bc6775aae2p-4;
    sp = sp * z + -0x1.4abbce625be53p-1;
    const f64x8 sn = r * 0x1.921fb54442d18p+0 + (r * z) * sp;  // sin (pi/2) r
    f64x8 cp = z * 0x1.20c62c2f2d7f5p-34 + -0x1.b6e24f44b128fp-28;
    cp = cp * z + 0x1.f9d38a3763cc3p-22;
    cp = cp * z + -0x1.a6d1f2a204a8cp-16;
    cp = cp * z + 0x1.e1f506891babbp-11;
    cp = cp * z + -0x1.55d3c7e3cbffap-6;
    cp = cp * z + 0x1.03c1f081b5ac4p-2;
    cp = cp * z + -0x1.3bd3cc9be45dep+0;
    const f64x8 cs = 1.0 + z * cp;  // cos (pi/2) r
    const u64x8 q = n & 3;
    const i64x8 swap = (i64x8)((q & 1) != 0);
    const f64x8 cm = swap ? sn : cs;
    const f64x8 sm = swap ? cs : sn;
    c = (i64x8)(((q + 1) & 2) != 0) ? -cm : cm;  // quadrants 1, 2: cos < 0
    s = (i64x8)((q & 2) != 0) ? -sm : sm;        // quadrants 2, 3: sin < 0
}

// u1 = ((w0 >> 11) + 1) 2^-53 in (0, 1]: the + 1 keeps u1 = 0 (log u1 = -inf) out.
inline f64x8 uniform1_v(u64x8 w0) { return __builtin_convertvector((w0 >> 11) + 1, f64x8) * 0x1p-53; }

// (a0, b0, a1, b1, ..., a3, b3) and (a4, b4, ..., a7, b7): GCC's __builtin_shuffle, clang's
// __builtin_shufflevector (the same lanes; clang has no __builtin_shuffle).
inline f64x8 interleave_lo(f64x8 a, f64x8 b) {
#if defined(__clang__)
    return __builtin_shufflevector(a, b, 0, 8, 1, 9, 2, 10, 3, 11);
#else
    return __builtin_shuffle(a, b, (i64x8){0, 8, 1, 9, 2, 10, 3, 11});
#endif
}
inline f64x8 interleave_hi(f64x8 a, f64x8 b) {
#if defined(__clang__)
    return __builtin_shufflevector(a, b, 4, 12, 5, 13, 6, 14, 7, 15);
#else
    return __builtin_shuffle(a, b, (i64x8){4, 12, 5, 13, 6, 14, 7, 15});
#endif
}

constexpr int G = 4;            // vectors of 8 pairs per block
constexpr int64_t BLOCK = 8 * G;  // pairs per block

// Pairs p .. p + BLOCK - 1 of model m, interleaved (cos entry, sin entry) into dst[0 .. 2 BLOCK).
inline void block(const Keys& key, uint64_t m, uint64_t p, double* dst) {
    const u64x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    u64x8 c[4][G];
    for (int g = 0; g < G; ++g) {
        const u64x8 pp = p + 8 * (uint64_t)g + lane;
        c[0][g] = pp & LO32;
        c[1][g] = pp >> 32;
        c[2][g] = (u64x8){} + (m & LO32);
        c[3][g] = (u64x8){} + (m >> 32);
    }
    philox<G>(c, key);
    for (int g = 0; g < G; ++g) {
        const u64x8 w0 = c[0][g] | (c[1][g] << 32), w1 = c[2][g] | (c[3][g] << 32);
        const f64x8 r2 = log_v(uniform1_v(w0)) * -2.0 + 0.0;  // + 0.0: u1 = 1 gives +0, not -0
#ifdef __AVX512F__
        const f64x8 rad = (f64x8)_mm512_sqrt_pd((__m512d)r2);  // one zmm sqrt (GCC splits the loop below in two)
#else
        f64x8 rad;
#pragma omp simd
        for (int j = 0; j < 8; ++j) rad[j] = __builtin_sqrt(r2[j]);
#endif
        f64x8 cs, sn;
        sincos_turns_v(w1 >> 11, cs, sn);
        const f64x8 z0 = rad * cs, z1 = rad * sn;
        const f64x8 lo = interleave_lo(z0, z1), hi = interleave_hi(z0, z1);
        std::memcpy(dst + 16 * g, &lo, sizeof lo);
        std::memcpy(dst + 16 * g + 8, &hi, sizeof hi);
    }
}

}  // namespace

extern "C" {

// Rows [0, rows) of out (rows x D, row-major): the noise of models first_model .. first_model + rows - 1
// (unsigned: model numbers reach 2^64 - 1; crfl.noise checks first_model + rows <= 2^64).
void normal_fill(uint64_t key_, uint64_t first_model, int64_t rows, int64_t D, double* out) {
    const Keys key(key_);
    const int64_t full = D / 2;  // pairs with both entries in the row
    for (int64_t r = 0; r < rows; ++r) {
        const uint64_t m = first_model + (uint64_t)r;
        double* row = out + r * D;
        int64_t p = 0;
        for (; p + BLOCK <= full; p += BLOCK) block(key, m, (uint64_t)p, row + 2 * p);
        if (2 * p < D) {  // the last pairs (and an odd D's lone cos entry): a whole block computed, copied in part
            double tmp[2 * BLOCK];
            block(key, m, (uint64_t)p, tmp);
            std::memcpy(row + 2 * p, tmp, sizeof(double) * (size_t)(D - 2 * p));
        }
    }
}

// Test hooks: the same functions on n inputs (padded to whole vectors inside).
void normal_log(const double* x, double* y, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) {
        f64x8 v = {1, 1, 1, 1, 1, 1, 1, 1};
        for (int64_t j = 0; j < 8 && i + j < n; ++j) v[j] = x[i + j];
        const f64x8 l = log_v(v);
        for (int64_t j = 0; j < 8 && i + j < n; ++j) y[i + j] = l[j];
    }
}

void normal_sincos_turns(const uint64_t* k, double* c, double* s, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) {
        u64x8 v = {};
        for (int64_t j = 0; j < 8 && i + j < n; ++j) v[j] = k[i + j];
        f64x8 cv, sv;
        sincos_turns_v(v, cv, sv);
        for (int64_t j = 0; j < 8 && i + j < n; ++j) {
            c[i + j] = cv[j];
            s[i + j] = sv[j];
        }
    }
}

void normal_uniform1(const uint64_t* w0, double* u1, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) {
        u64x8 v = {};
        for (int64_t j = 0; j < 8 && i + j < n; ++j) v[j] = w0[i + j];
        const f64x8 u = uniform1_v(v);
        for (int64_t j = 0; j < 8 && i + j < n; ++j) u1[i + j] = u[j];
    }
}

// Philox4x32-10 of n counters (ctr: n x 4 words, out: n x 4 words), for the known-answer tests.
void normal_philox(const uint32_t* ctr, uint64_t key, uint32_t* out, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) {
        u64x8 c[4][1] = {};
        for (int64_t j = 0; j < 8 && i + j < n; ++j)
            for (int w = 0; w < 4; ++w) c[w][0][j] = ctr[4 * (i + j) + w];
        philox<1>(c, Keys(key));
        for (int64_t j = 0; j < 8 && i + j < n; ++j)
            for (int w = 0; w < 4; ++w) out[4 * (i + j) + w] = (uint32_t)c[w][0][j];
    }
}

}  // extern "C"
