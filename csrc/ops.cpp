// The per-token float ops. Oracle: tritlm/models/reference.py, and gguf.quants for the weight types.
//
// One generic body, three instruction sets. Every kernel is a template over V, a vector of 16
// floats: one zmm (AVX-512), two ymm (AVX2 + FMA + F16C), or a float[16] the compiler vectorizes
// for whatever the build targets (SSE2, NEON, nothing). Each ISA gets a table of entry points that
// carry its target attribute plus `flatten`, which inlines the generic templates and V's methods
// into code compiled for that ISA; the table is picked at run time by the kernel-set names.
// Why not target_clones on auto-vectorized loops: f16 conversion, exp and FMA dot products do not
// auto-vectorize reliably, and named tables let the tests run every ISA on one machine. Nothing
// needs -m flags, so the file builds unchanged for aarch64 or x86 without AVX (portable only).
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "dispatch.h"
#include "threadpool.h"

#if defined(__x86_64__) || defined(_M_X64)
#define TRITLM_X86 1
#include <immintrin.h>
#define TRITLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define TRITLM_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

#if defined(__aarch64__)
#define TRITLM_NEON 1
#include <arm_neon.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
// V's registers pass between generic templates that are always inlined into an entry point of
// their ISA, so GCC's ABI note about standalone copies never applies. GCC 12's AVX-512 headers
// trip -Wuninitialized on their own _mm512_undefined_* helpers.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace tritlm {
namespace ops {

using detail::as_bits;
using detail::as_float;

uint16_t float_to_half(float f) {
#if defined(__aarch64__)
  const __fp16 h = f;  // fcvt rounds to nearest even
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
#else
  uint32_t x = as_bits(f);
  const uint16_t sign = uint16_t(x >> 16 & 0x8000);
  x &= 0x7fffffff;
  if (x > 0x7f800000) return sign | 0x7e00 | (x >> 13 & 0x3ff);  // NaN, made quiet as F16C does
  if (x >= 0x477ff000) return sign | 0x7c00;                     // 65520 and up round to infinity
  if (x >= 0x38800000)  // normal half: rebias, then round the 13 dropped bits to nearest even
    return sign | uint16_t((x - 0x38000000 + 0xfff + (x >> 13 & 1)) >> 13);
  // Subnormal half: in [0.5, 1) a float's step is 2^-24, the half subnormal step, so adding 0.5
  // makes the FPU round to nearest even for us.
  return sign | uint16_t(as_bits(as_float(x) + 0.5f) - 0x3f000000);
#endif
}

namespace {

// ------------------------------------------------------------------------- vectors of 16 floats

// Any CPU: loops over 16 lanes that the compiler vectorizes. min/max follow x86's rule (the
// second operand when either is NaN) so every ISA treats NaN alike.
struct Portable {
  struct R { float v[16]; };
  static constexpr int kRegisterChunks = 4;  // accumulators kept per query in a register pass
  template <class F> static R map(F f) {
    R r;
    for (int i = 0; i < 16; ++i) r.v[i] = f(i);
    return r;
  }
  static R set1(float a) { return map([&](int) { return a; }); }
  static R zero() { return set1(0.0f); }
  static R load(const float* p) { R r; std::memcpy(r.v, p, sizeof r.v); return r; }
  static R load_f16(const uint16_t* p) {
    uint16_t h[16];
    std::memcpy(h, p, sizeof h);
    return map([&](int i) { return half_to_float(h[i]); });
  }
  static R load_i8(const int8_t* p) { return map([&](int i) { return float(p[i]); }); }
  static float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return half_to_float(h); }
  // 32 int8 as int16, and lane i = x[2i] q[2i] + x[2i+1] q[2i+1] of 32 int16 x: exact (< 2^24)
  struct W { int16_t v[32]; };
  static W widen_i8(const int8_t* q) { W w; for (int i = 0; i < 32; ++i) w.v[i] = q[i]; return w; }
  static R dot_pairs(const int16_t* x, const W& q) {
    return map([&](int i) { return float(int32_t(x[2 * i]) * q.v[2 * i] + int32_t(x[2 * i + 1]) * q.v[2 * i + 1]); });
  }
  // Lane i = sum over j < 4 of u[4i+j] (256 xh[4i+j] + xl[4i+j]), u < 64: exact (< 2^24)
  static R dot_split(const uint8_t* u, const int8_t* xh, const uint8_t* xl) {
    return map([&](int i) {
      int32_t a = 0;
      for (int j = 4 * i; j < 4 * i + 4; ++j) a += int32_t(u[j]) * (256 * xh[j] + xl[j]);
      return float(a);
    });
  }
  static R spread4(const float* s) { return map([&](int i) { return s[i / 4]; }); }  // lane i = s[i / 4]
  static void store(float* p, R a) { std::memcpy(p, a.v, sizeof a.v); }
  static void store_f16(uint16_t* p, R a) { for (int i = 0; i < 16; ++i) p[i] = float_to_half(a.v[i]); }
  static R add(R a, R b) { return map([&](int i) { return a.v[i] + b.v[i]; }); }
  static R sub(R a, R b) { return map([&](int i) { return a.v[i] - b.v[i]; }); }
  static R mul(R a, R b) { return map([&](int i) { return a.v[i] * b.v[i]; }); }
  static R div(R a, R b) { return map([&](int i) { return a.v[i] / b.v[i]; }); }
  static R fma(R a, R b, R c) { return map([&](int i) { return a.v[i] * b.v[i] + c.v[i]; }); }
  static R min(R a, R b) { return map([&](int i) { return a.v[i] < b.v[i] ? a.v[i] : b.v[i]; }); }
  static R max(R a, R b) { return map([&](int i) { return a.v[i] > b.v[i] ? a.v[i] : b.v[i]; }); }
  // to nearest even, for |a| < 2^22: adding 1.5 * 2^23 leaves no fraction bits
  static R round(R a) { return map([&](int i) { return (a.v[i] + 0x1.8p23f) - 0x1.8p23f; }); }
  static float pow2(int32_t n) {  // 2^n for n in [-126, 127]
    const uint32_t bits = uint32_t(n + 127) << 23;
    float s;
    std::memcpy(&s, &bits, 4);
    return s;
  }
  static R scale2(R p, R n) {  // p * 2^n for integral n in [-126, 128], in two exact halves
    return map([&](int i) {
      const int32_t e = int32_t(n.v[i] == n.v[i] ? n.v[i] : 0.0f), half = e / 2;
      return p.v[i] * pow2(half) * pow2(e - half);
    });
  }
  static float sum(R a) {
    for (int w = 8; w; w /= 2)
      for (int i = 0; i < w; ++i) a.v[i] += a.v[i + w];
    return a.v[0];
  }
  static void sum4(R a, R b, R c, R d, float* out) {
    out[0] = sum(a), out[1] = sum(b), out[2] = sum(c), out[3] = sum(d);
  }
  static float max_of(R a) {
    float m = a.v[0];
    for (int i = 1; i < 16; ++i) m = a.v[i] > m ? a.v[i] : m;
    return m;
  }
  static R load_partial(const float* p, int n) { R r = zero(); std::memcpy(r.v, p, 4 * n); return r; }
  static R load_partial_f16(const uint16_t* p, int n) {
    uint16_t h[16] = {};
    std::memcpy(h, p, 2 * n);
    return load_f16(h);
  }
  static void store_partial(float* p, R a, int n) { std::memcpy(p, a.v, 4 * n); }
};

#ifdef TRITLM_X86
struct Avx512 {
  using R = __m512;
  static constexpr int kRegisterChunks = 4;  // 32 zmm: 4 queries x 4 chunks of accumulators
  TRITLM_AVX512 static __mmask16 first(int n) { return __mmask16((1u << n) - 1); }
  TRITLM_AVX512 static R set1(float a) { return _mm512_set1_ps(a); }
  TRITLM_AVX512 static R zero() { return _mm512_setzero_ps(); }
  TRITLM_AVX512 static R load(const float* p) { return _mm512_loadu_ps(p); }
  TRITLM_AVX512 static R load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  TRITLM_AVX512 static float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }
  TRITLM_AVX512 static R load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  using W = __m512i;
  TRITLM_AVX512 static W widen_i8(const int8_t* q) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  }
  TRITLM_AVX512 static R dot_pairs(const int16_t* x, W q) {
    return _mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_loadu_si512(x), q));
  }
  TRITLM_AVX512 static R dot_split(const uint8_t* u, const int8_t* xh, const uint8_t* xl) {
    const __m512i codes = _mm512_loadu_si512(u);
    const __m512i high = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512(xh));
    return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_slli_epi32(high, 8), _mm512_loadu_si512(xl), codes));
  }
  TRITLM_AVX512 static R spread4(const float* s) {
    const __m512i lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_loadu_ps(s)));
  }
  TRITLM_AVX512 static void store(float* p, R a) { _mm512_storeu_ps(p, a); }
  TRITLM_AVX512 static void store_f16(uint16_t* p, R a) {
    const __m256i h = _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
  TRITLM_AVX512 static R add(R a, R b) { return _mm512_add_ps(a, b); }
  TRITLM_AVX512 static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  TRITLM_AVX512 static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  TRITLM_AVX512 static R div(R a, R b) { return _mm512_div_ps(a, b); }
  TRITLM_AVX512 static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  TRITLM_AVX512 static R min(R a, R b) { return _mm512_min_ps(a, b); }
  TRITLM_AVX512 static R max(R a, R b) { return _mm512_max_ps(a, b); }
  TRITLM_AVX512 static R round(R a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  TRITLM_AVX512 static R scale2(R p, R n) { return _mm512_scalef_ps(p, n); }
  TRITLM_AVX512 static float sum(R a) { return _mm512_reduce_add_ps(a); }
  TRITLM_AVX512 static void sum4(R a, R b, R c, R d, float* out) {  // 4 horizontal sums at once
    const R ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const R cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    // a b c d in each 128 bits, then the four 128-bit parts added
    const R abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xee));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1)));
  }
  TRITLM_AVX512 static float max_of(R a) { return _mm512_reduce_max_ps(a); }
  TRITLM_AVX512 static R load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  TRITLM_AVX512 static R load_partial_f16(const uint16_t* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), p));
  }
  TRITLM_AVX512 static void store_partial(float* p, R a, int n) { _mm512_mask_storeu_ps(p, first(n), a); }
};

struct Avx2 {
  struct R { __m256 lo, hi; };
  static constexpr int kRegisterChunks = 2;  // 16 ymm
  TRITLM_AVX2 static R set1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
  TRITLM_AVX2 static R zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  TRITLM_AVX2 static R load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  TRITLM_AVX2 static R load_f16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
  }
  TRITLM_AVX2 static float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }
  TRITLM_AVX2 static R load_i8(const int8_t* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
  }
  struct W { __m256i lo, hi; };
  TRITLM_AVX2 static W widen_i8(const int8_t* q) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    return {_mm256_cvtepi8_epi16(_mm256_castsi256_si128(b)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(b, 1))};
  }
  TRITLM_AVX2 static R dot_pairs(const int16_t* x, const W& q) {
    const __m256i* v = reinterpret_cast<const __m256i*>(x);
    return {_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_loadu_si256(v), q.lo)),
            _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_loadu_si256(v + 1), q.hi))};
  }
  TRITLM_AVX2 static __m256 dot_split8(const uint8_t* u, const int8_t* xh, const uint8_t* xl) {
    // maddubs cannot saturate here: pairs of 63 * 128 and of 255 * 63 stay below 2^15
    const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u)), one = _mm256_set1_epi16(1);
    const __m256i high = _mm256_madd_epi16(
        _mm256_maddubs_epi16(codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh))), one);
    const __m256i low = _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xl)), codes), one);
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(high, 8), low));
  }
  TRITLM_AVX2 static R dot_split(const uint8_t* u, const int8_t* xh, const uint8_t* xl) {
    return {dot_split8(u, xh, xl), dot_split8(u + 32, xh + 32, xl + 32)};
  }
  TRITLM_AVX2 static R spread4(const float* s) {
    return {_mm256_set_m128(_mm_set1_ps(s[1]), _mm_set1_ps(s[0])), _mm256_set_m128(_mm_set1_ps(s[3]), _mm_set1_ps(s[2]))};
  }
  TRITLM_AVX2 static void store(float* p, R a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
  TRITLM_AVX2 static void store_f16(uint16_t* p, R a) {
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.lo, kNearest));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(a.hi, kNearest));
  }
  TRITLM_AVX2 static R add(R a, R b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
  TRITLM_AVX2 static R sub(R a, R b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
  TRITLM_AVX2 static R mul(R a, R b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  TRITLM_AVX2 static R div(R a, R b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
  TRITLM_AVX2 static R fma(R a, R b, R c) {
    return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
  }
  TRITLM_AVX2 static R min(R a, R b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
  TRITLM_AVX2 static R max(R a, R b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
  TRITLM_AVX2 static R round(R a) {
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return {_mm256_round_ps(a.lo, kNearest), _mm256_round_ps(a.hi, kNearest)};
  }
  TRITLM_AVX2 static __m256 scale2(__m256 p, __m256 n) {  // p * 2^n for integral n in [-126, 128]
    const __m256i e = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(e, 1), bias = _mm256_set1_epi32(127);
    const __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(e, half), bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, a), b);  // two exact halves: 2^128 is no float
  }
  TRITLM_AVX2 static R scale2(R p, R n) { return {scale2(p.lo, n.lo), scale2(p.hi, n.hi)}; }
  TRITLM_AVX2 static float sum(R a) {
    const __m256 s = _mm256_add_ps(a.lo, a.hi);
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  TRITLM_AVX2 static void sum4(R a, R b, R c, R d, float* out) {
    const __m256 ab = _mm256_hadd_ps(_mm256_add_ps(a.lo, a.hi), _mm256_add_ps(b.lo, b.hi));
    const __m256 cd = _mm256_hadd_ps(_mm256_add_ps(c.lo, c.hi), _mm256_add_ps(d.lo, d.hi));
    const __m256 abcd = _mm256_hadd_ps(ab, cd);  // a b c d in each 128-bit half
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
  }
  TRITLM_AVX2 static float max_of(R a) {
    const __m256 s = _mm256_max_ps(a.lo, a.hi);
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
  }
  TRITLM_AVX2 static R load_partial(const float* p, int n) {
    float f[16] = {};
    std::memcpy(f, p, 4 * n);
    return load(f);
  }
  TRITLM_AVX2 static R load_partial_f16(const uint16_t* p, int n) {
    uint16_t h[16] = {};
    std::memcpy(h, p, 2 * n);
    return load_f16(h);
  }
  TRITLM_AVX2 static void store_partial(float* p, R a, int n) {
    float f[16];
    store(f, a);
    std::memcpy(p, f, 4 * n);
  }
};
#endif

#ifdef TRITLM_NEON
// Baseline ASIMD, four q registers. Written to give the AVX-512 and AVX2 ops' results bit for bit:
// fused multiply-adds where they fuse, the same halving tree in sum, and x86's min/max (the
// second operand when either is NaN), which FMIN/FMAX do not follow.
struct Neon {
  struct R { float32x4_t v[4]; };
  static constexpr int kRegisterChunks = 2;  // 32 registers, 4 per vector: as AVX2's 16 of 2
  template <class F> static R map(F f) { return {{f(0), f(1), f(2), f(3)}}; }
  static R set1(float a) { const float32x4_t v = vdupq_n_f32(a); return {{v, v, v, v}}; }
  static R zero() { return set1(0.0f); }
  static R load(const float* p) { return map([&](int i) { return vld1q_f32(p + 4 * i); }); }
  static R load_f16(const uint16_t* p) {
    return map([&](int i) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4 * i))); });
  }
  static float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return half_to_float(h); }
  static R load_i8(const int8_t* p) {
    const int8x16_t b = vld1q_s8(p);
    const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_high_s8(b);
    return {{vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), vcvtq_f32_s32(vmovl_high_s16(lo)),
             vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), vcvtq_f32_s32(vmovl_high_s16(hi))}};
  }
  struct W { int16x8_t v[4]; };
  static W widen_i8(const int8_t* q) {
    const int8x16_t a = vld1q_s8(q), b = vld1q_s8(q + 16);
    return {{vmovl_s8(vget_low_s8(a)), vmovl_high_s8(a), vmovl_s8(vget_low_s8(b)), vmovl_high_s8(b)}};
  }
  static R dot_pairs(const int16_t* x, const W& q) {  // (every sum an exact integer)
    return map([&](int i) {
      const int16x8_t xv = vld1q_s16(x + 8 * i);
      const int32x4_t lo = vmull_s16(vget_low_s16(xv), vget_low_s16(q.v[i])), hi = vmull_high_s16(xv, q.v[i]);
      return vcvtq_f32_s32(vpaddq_s32(lo, hi));
    });
  }
  static R dot_split(const uint8_t* u, const int8_t* xh, const uint8_t* xl) {
    return map([&](int i) {
      const uint8x16_t codes = vld1q_u8(u + 16 * i), low = vld1q_u8(xl + 16 * i);
      const int8x16_t high = vld1q_s8(xh + 16 * i), signed_codes = vreinterpretq_s8_u8(codes);  // (< 64)
      const int16x8_t h0 = vmull_s8(vget_low_s8(signed_codes), vget_low_s8(high)), h1 = vmull_high_s8(signed_codes, high);
      const uint16x8_t l0 = vmull_u8(vget_low_u8(codes), vget_low_u8(low)), l1 = vmull_high_u8(codes, low);
      const int32x4_t h = vpaddq_s32(vpaddlq_s16(h0), vpaddlq_s16(h1));
      const int32x4_t l = vreinterpretq_s32_u32(vpaddq_u32(vpaddlq_u16(l0), vpaddlq_u16(l1)));
      return vcvtq_f32_s32(vaddq_s32(vshlq_n_s32(h, 8), l));
    });
  }
  static R spread4(const float* s) { return map([&](int i) { return vdupq_n_f32(s[i]); }); }
  static void store(float* p, const R& a) { for (int i = 0; i < 4; ++i) vst1q_f32(p + 4 * i, a.v[i]); }
  static void store_f16(uint16_t* p, const R& a) {  // FCVTN rounds to nearest even
    for (int i = 0; i < 4; ++i) vst1_u16(p + 4 * i, vreinterpret_u16_f16(vcvt_f16_f32(a.v[i])));
  }
  static R add(const R& a, const R& b) { return map([&](int i) { return vaddq_f32(a.v[i], b.v[i]); }); }
  static R sub(const R& a, const R& b) { return map([&](int i) { return vsubq_f32(a.v[i], b.v[i]); }); }
  static R mul(const R& a, const R& b) { return map([&](int i) { return vmulq_f32(a.v[i], b.v[i]); }); }
  static R div(const R& a, const R& b) { return map([&](int i) { return vdivq_f32(a.v[i], b.v[i]); }); }
  static R fma(const R& a, const R& b, const R& c) { return map([&](int i) { return vfmaq_f32(c.v[i], a.v[i], b.v[i]); }); }
  static float32x4_t min4(float32x4_t a, float32x4_t b) { return vbslq_f32(vcltq_f32(a, b), a, b); }
  static float32x4_t max4(float32x4_t a, float32x4_t b) { return vbslq_f32(vcgtq_f32(a, b), a, b); }
  static R min(const R& a, const R& b) { return map([&](int i) { return min4(a.v[i], b.v[i]); }); }
  static R max(const R& a, const R& b) { return map([&](int i) { return max4(a.v[i], b.v[i]); }); }
  static R round(const R& a) { return map([&](int i) { return vrndnq_f32(a.v[i]); }); }
  static R scale2(const R& p, const R& n) {  // p * 2^n for integral n in [-126, 128]: AVX2's two exact halves
    return map([&](int i) {
      const int32x4_t e = vcvtnq_s32_f32(n.v[i]), half = vshrq_n_s32(e, 1), bias = vdupq_n_s32(127);
      const float32x4_t a = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(half, bias), 23));
      const float32x4_t b = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vsubq_s32(e, half), bias), 23));
      return vmulq_f32(vmulq_f32(p.v[i], a), b);
    });
  }
  static float sum(const R& a) {  // lanes i + 8 onto i, then i + 4, i + 2, i + 1: x86's reduction order
    const float32x4_t s = vaddq_f32(vaddq_f32(a.v[0], a.v[2]), vaddq_f32(a.v[1], a.v[3]));
    const float32x2_t t = vadd_f32(vget_low_f32(s), vget_high_f32(s));
    return vget_lane_f32(t, 0) + vget_lane_f32(t, 1);
  }
  static float max_of(const R& a) {  // _mm512_reduce_max_ps's tree and operand order
    const float32x4_t s = max4(max4(a.v[3], a.v[1]), max4(a.v[2], a.v[0]));
    const float32x4_t t = max4(s, vextq_f32(s, s, 2));
    const float x = vgetq_lane_f32(t, 0), y = vgetq_lane_f32(t, 1);
    return x > y ? x : y;
  }
  static R load_partial(const float* p, int n) {
    float f[16] = {};
    std::memcpy(f, p, 4 * size_t(n));
    return load(f);
  }
  static R load_partial_f16(const uint16_t* p, int n) {
    uint16_t h[16] = {};
    std::memcpy(h, p, 2 * size_t(n));
    return load_f16(h);
  }
  static void store_partial(float* p, const R& a, int n) {
    float f[16];
    store(f, a);
    std::memcpy(p, f, 4 * size_t(n));
  }
};
#endif

template <class V> using Vec = typename V::R;

template <class V> Vec<V> load_n(const float* p, int n) { return n == 16 ? V::load(p) : V::load_partial(p, n); }
template <class V> Vec<V> load_n(const uint16_t* p, int n) {
  return n == 16 ? V::load_f16(p) : V::load_partial_f16(p, n);
}
template <class V> void store_n(float* p, const Vec<V>& a, int n) {
  if (n == 16) V::store(p, a);
  else V::store_partial(p, a, n);
}

// e^x: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial), within ~2 ulp. Below
// -87.3 the result stays ~1e-38 (2^n a normal float), which neither softmax nor SiLU can tell
// from 0; past ln(FLT_MAX) it is infinity, as in NumPy. NaN stays NaN.
template <class V> Vec<V> vexp(const Vec<V>& x_in) {
  const Vec<V> x = V::max(V::set1(-87.3f), V::min(V::set1(88.72f), x_in));
  const Vec<V> n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  Vec<V> r = V::fma(n, V::set1(-0.693359375f), x);
  r = V::fma(n, V::set1(2.12194440e-4f), r);
  Vec<V> p = V::set1(1.9875691500e-4f);
  p = V::fma(p, r, V::set1(1.3981999507e-3f));
  p = V::fma(p, r, V::set1(8.3334519073e-3f));
  p = V::fma(p, r, V::set1(4.1665795894e-2f));
  p = V::fma(p, r, V::set1(1.6666665459e-1f));
  p = V::fma(p, r, V::set1(5.0000001201e-1f));
  p = V::fma(p, V::mul(r, r), V::add(r, V::set1(1.0f)));
  // (x - ln(FLT_MAX)) * inf is -inf below and +inf above; max(NaN, y) is y
  return V::max(V::mul(V::sub(x_in, V::set1(88.7228394f)), V::set1(INFINITY)), V::scale2(p, n));
}

// ------------------------------------------------------------------------------------ RMSNorm

struct NormArgs {
  const float* x;
  const float* w;
  int64_t D;
  double eps;
  float* out;
};

template <class V> void rms_norm_rows(const NormArgs& a, int64_t begin, int64_t end) {
  const int64_t D = a.D;
  for (int64_t t = begin; t < end; ++t) {
    const float* x = a.x + t * D;
    float* y = a.out + t * D;
    double acc[8] = {};  // a float's square is exact in double; 8 partial sums vectorize
    int64_t i = 0;
    for (; i + 8 <= D; i += 8)
      for (int j = 0; j < 8; ++j) acc[j] += double(x[i + j]) * x[i + j];
    for (; i < D; ++i) acc[0] += double(x[i]) * x[i];
    double sum = 0.0;
    for (double s : acc) sum += s;
    // NaN anywhere makes the row NaN, and infinity makes s = 0 (so inf * 0 = NaN there), as in
    // the reference: no error, the next quantize call rejects non-finite activations.
    const Vec<V> s = V::set1(float(1.0 / std::sqrt(sum / double(D) + a.eps)));
    for (i = 0; i < D; i += 16) {  // (x * s) * w, the reference's order
      const int n = int(std::min<int64_t>(16, D - i));
      store_n<V>(y + i, V::mul(V::mul(load_n<V>(x + i, n), s), load_n<V>(a.w + i, n)), n);
    }
  }
}

// ------------------------------------------------------------------------------- KV cache rows

template <class V> void to_f16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) V::store_f16(dst + i, V::load(src + i));
  for (; i < n; ++i) dst[i] = float_to_half(src[i]);
}

// ----------------------------------------------------------------------------------- gated FFN

struct GatedArgs {
  const float* gate;
  const float* up;
  float* out;
  Activation act;
};

template <class V> Vec<V> gated16(const Vec<V>& g, const Vec<V>& u, Activation act) {
  if (act == Activation::relu2) {
    const Vec<V> m = V::max(V::zero(), g);  // max(0, NaN) is NaN: NaN propagates like np.maximum
    return V::mul(V::mul(m, m), u);
  }
  Vec<V> z = V::sub(V::zero(), g);  // SiLU: g / (1 + e^-g)
  if (act == Activation::gelu_tanh)  // g / (1 + e^-2u)
    z = V::mul(V::set1(-1.5957691216057308f), V::fma(V::mul(V::set1(0.044715f), g), V::mul(g, g), g));
  return V::mul(V::div(g, V::add(V::set1(1.0f), vexp<V>(z))), u);
}

template <class V> void gated_range(const GatedArgs& a, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += 16) {
    const int n = int(std::min<int64_t>(16, end - i));
    store_n<V>(a.out + i, gated16<V>(load_n<V>(a.gate + i, n), load_n<V>(a.up + i, n), a.act), n);
  }
}

// ----------------------------------------------------------------------------------- attention

struct AttentionArgs {
  Attention a;
  float scale;     // of q . k
  int64_t chunk;   // query heads per work item
  int64_t tokens;  // tokens per work item
};


// Keys are taken in blocks at fixed multiples of kKeyBlock, each folded into a running softmax
// (flash attention): no score row longer than a block, and a query's arithmetic depends only
// on its own position, never on which tokens share its work item or how many threads run.
// A work item holds up to kItemTokens tokens, which take each block in turn while its keys
// and values are still in L1/L2: a long prompt reads the cache once per item, not per token.
constexpr int64_t kKeyBlock = 128, kItemTokens = 16;

// kt[d * kKeyBlock + j] = element d of key row j, for n <= 8 rows (`stride` apart) of D elements:
// a block's keys turned, so that 16 scores at once are one chain of FMAs over d (no horizontal
// sums). AVX2 turns 8 x 8 tiles: each 128-bit half of a register holds 4 elements of a row.
#ifdef TRITLM_X86
TRITLM_AVX2 inline __m128 four_floats(const float* p) { return _mm_loadu_ps(p); }
TRITLM_AVX2 inline __m128 four_floats(const uint16_t* p) {
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
template <class C> TRITLM_AVX2 void turn_8x8(const C* k, int64_t stride, float* kt) {
  for (int h = 0; h < 8; h += 4) {  // elements h .. h+3 of the 8 rows
    __m256 r[4];  // r[i]: row i | row i + 4
    for (int i = 0; i < 4; ++i) r[i] = _mm256_set_m128(four_floats(k + (i + 4) * stride + h), four_floats(k + i * stride + h));
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    _mm256_storeu_ps(kt + (h + 0) * kKeyBlock, _mm256_shuffle_ps(t0, t2, 0x44));
    _mm256_storeu_ps(kt + (h + 1) * kKeyBlock, _mm256_shuffle_ps(t0, t2, 0xee));
    _mm256_storeu_ps(kt + (h + 2) * kKeyBlock, _mm256_shuffle_ps(t1, t3, 0x44));
    _mm256_storeu_ps(kt + (h + 3) * kKeyBlock, _mm256_shuffle_ps(t1, t3, 0xee));
  }
}
#endif
template <class V, class C> void turn_keys(const C* k, int64_t stride, int64_t n, int64_t D, float* kt) {
  int64_t d = 0;
#ifdef TRITLM_X86
  if constexpr (!std::is_same_v<V, Portable>)
    if (n == 8)
      for (; d + 8 <= D; d += 8) turn_8x8(k + d, stride, kt + d * kKeyBlock);
#endif
  for (; d < D; ++d)
    for (int64_t j = 0; j < n; ++j) {
      const C e = k[j * stride + d];
      if constexpr (std::is_same_v<C, uint16_t>) kt[d * kKeyBlock + j] = half_to_float(e);
      else kt[d * kKeyBlock + j] = e;
    }
}

// Cache rows asked for ahead of their use: a head's rows lie Hkv * D apart, a stride the
// hardware prefetchers follow poorly. Into L2: an L1 prefetch would hold a fill buffer for the
// whole trip from DRAM. fetch(i) asks for row i < end of the keys and of the values; next()
// for row `from`, then the one after.
constexpr int64_t kRowsAhead = 32;
struct Ahead {
  const char *k = nullptr, *v = nullptr;
  int64_t stride = 0, bytes = 0, from = 0, end = 0;  // bytes between and in rows, the rows to ask for
  void fetch(int64_t i) const {
    if (i >= end) return;
    for (int64_t o = 0; o < bytes; o += 64) {
      __builtin_prefetch(k + i * stride + o, 0, 1);
      __builtin_prefetch(v + i * stride + o, 0, 1);
    }
  }
  void next() { if (from < end) fetch(from++); }
};

// p[i * kKeyBlock + j] = scale * q_i . k_j for Q queries (qs: rows `row` apart) and keys j in
// [j0, j1), from turned keys kt, in tiles of 16 NT keys that start at multiples of 16 NT (a
// tile may run past j1, never past the block). Each score is one FMA chain over d = 0 .. D-1,
// whatever tile it falls in: FMA chains over kChain elements, added up in order (one chain over
// all of d would lose accuracy). A row of `ahead` is asked for per tile.
constexpr int64_t kChain = 16;
template <class V, int Q>
void key_scores(const float* kt, const float* qs, int64_t row, int64_t D, float scale, int64_t j0, int64_t j1,
                Ahead& ahead, float* p) {
  using R = Vec<V>;
  constexpr int NT = std::max(1, 2 * V::kRegisterChunks / Q);  // Q x NT accumulators: AVX2 8 ymm
  for (int64_t j = j0 / (16 * NT) * (16 * NT); j < j1; j += 16 * NT) {
    ahead.next();
    R sum[Q][NT];
    for (int64_t d0 = 0; d0 < D; d0 += kChain) {
      R acc[Q][NT];
      for (int i = 0; i < Q; ++i)
        for (int t = 0; t < NT; ++t) acc[i][t] = V::zero();
      for (int64_t d = d0; d < std::min(d0 + kChain, D); ++d) {
        R k[NT];
        for (int t = 0; t < NT; ++t) k[t] = V::load(kt + d * kKeyBlock + j + 16 * t);
        for (int i = 0; i < Q; ++i) {
          const R q = V::set1(qs[i * row + d]);
          for (int t = 0; t < NT; ++t) acc[i][t] = V::fma(q, k[t], acc[i][t]);
        }
      }
      for (int i = 0; i < Q; ++i)
        for (int t = 0; t < NT; ++t) sum[i][t] = d0 ? V::add(sum[i][t], acc[i][t]) : acc[i][t];
    }
    for (int i = 0; i < Q; ++i)
      for (int t = 0; t < NT; ++t) V::store(p + i * kKeyBlock + j + 16 * t, V::mul(sum[i][t], V::set1(scale)));
  }
}

// o[i][0, width) = alpha[i] o[i][0, width) + sum over n keys of p[i][j] v_j[0, width), for Q
// queries (o: rows of `o_stride` floats, padded to whole chunks), width <= 16 G: the Q x G
// accumulators stay in registers for the whole pass. Full: width is 16 G, so no value load
// needs a mask.
template <class V, class C, int Q, int G, bool Full>
void add_values(const C* v, int64_t stride, const float* p, int64_t p_stride, int64_t n, const float* alpha,
                float* o, int64_t o_stride, int width) {
  using R = Vec<V>;
  int w[G];
  for (int c = 0; c < G; ++c) w[c] = Full ? 16 : std::clamp(width - 16 * c, 0, 16);
  R acc[Q][G];
  for (int i = 0; i < Q; ++i)
    for (int c = 0; c < G; ++c)  // (a chunk past the row may lie past the buffer)
      acc[i][c] = w[c] ? V::mul(V::load(o + i * o_stride + 16 * c), V::set1(alpha[i])) : V::zero();
  for (int64_t j = 0; j < n; ++j, v += stride) {
    for (int c = 0; c < G; ++c) {
      const R vc = Full ? load_n<V>(v + 16 * c, 16) : load_n<V>(v + 16 * c, w[c]);
      for (int i = 0; i < Q; ++i) acc[i][c] = V::fma(V::set1(p[i * p_stride + j]), vc, acc[i][c]);
    }
  }
  for (int i = 0; i < Q; ++i)
    for (int c = 0; c < G; ++c)
      if (w[c]) V::store(o + i * o_stride + 16 * c, acc[i][c]);
}

// Turns s[0, n) into e^(s - m') for m' = max(m, max s) and returns e^(m - m') (0 while m is
// -inf: nothing seen yet), updating m to m' and the running sum l to l e^(m - m') + sum.
template <class V> float softmax_step(float* s, int64_t n, float& m, float& l) {
  using R = Vec<V>;
  R m16 = V::set1(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) m16 = V::max(m16, V::load(s + j));
  float top = V::max_of(m16);
  for (; j < n; ++j) top = s[j] > top ? s[j] : top;
  const float before = m;
  m = std::max(m, top);
  R total = V::zero();
  for (j = 0; j < n; j += 16) {
    const int k = int(std::min<int64_t>(16, n - j));
    const R e = vexp<V>(V::sub(load_n<V>(s + j, k), V::set1(m)));
    if (k == 16) {
      V::store(s + j, e);
      total = V::add(total, e);
    } else {  // the padding lanes hold e^-m: keep them out of the sum
      float tail[16] = {};
      V::store_partial(tail, e, k);
      std::memcpy(s + j, tail, 4 * size_t(k));
      total = V::add(total, V::load(tail));
    }
  }
  const float alpha = before == -INFINITY ? 0.0f : std::exp(before - m);
  l = l * alpha + V::sum(total);
  return alpha;
}

// The first cache row query t sees: 0, or the start of its window.
inline int64_t first_key(const Attention& a, int64_t t) {
  return a.window > 0 ? std::max<int64_t>(0, a.positions[t] - a.window + 1) : 0;
}

struct AttentionScratch {
  std::vector<float> q, o, p, m, l;  // per token of the item: queries, outputs, and running max and sum
  std::vector<float> kt, v;          // a block's keys turned, and (f16, several tokens) its values as floats
};

// One token's keys (kt: the block's, turned; this token's from column j0) and values v (rows
// `stride` apart; n of them) folded into the running softmax of Q query heads: queries qs
// (zero-padded rows of `row` floats), outputs o (same), max m and sum l; p: scratch for Q x
// kKeyBlock scores. `ahead`: rows to ask for meanwhile.
template <class V, class E, int Q>
void fold_block(const AttentionArgs& args, const float* kt, int64_t j0, const E* v, int64_t stride, int64_t n,
                Ahead ahead, const float* qs, float* o, int64_t row, float* m, float* l, float* p) {
  const int64_t D = args.a.D, nc = row / 16;
  key_scores<V, Q>(kt, qs, row, D, args.scale, j0, j0 + n, ahead, p);
  p += j0;
  float alpha[Q];
  for (int i = 0; i < Q; ++i) alpha[i] = softmax_step<V>(p + i * kKeyBlock, n, m[i], l[i]);
  // The weighted values, a few chunks of D for a few heads at a time so that the accumulators
  // stay in registers (AVX2: 2 heads x 2 chunks); a pass reads only its part of each row.
  constexpr int G = V::kRegisterChunks, H = G >= 4 ? Q : Q % 2 ? 1 : 2;
  for (int i0 = 0; i0 < Q; i0 += H)
    for (int64_t c0 = 0; c0 < nc; c0 += G) {
      const float* pi = p + i0 * kKeyBlock;
      float* oc = o + i0 * row + 16 * c0;
      if (D - 16 * c0 >= 16 * G) add_values<V, E, H, G, true>(v + 16 * c0, stride, pi, kKeyBlock, n, alpha + i0, oc, row, 16 * G);
      else add_values<V, E, H, G, false>(v + 16 * c0, stride, pi, kKeyBlock, n, alpha + i0, oc, row, int(D - 16 * c0));
    }
}

// Query heads h0 .. h0+Q-1 of tokens t0 .. t0+nt-1, all reading KV head g. Each block's keys
// are turned once for the item (and, f16 with several tokens, its values made floats once);
// each value row is loaded once for the Q heads of a token.
template <class V, class C, int Q>
void attend(const AttentionArgs& args, int64_t t0, int64_t nt, int64_t g, int64_t h0, AttentionScratch& s) {
  const Attention& a = args.a;
  const int64_t D = a.D, nc = (D + 15) / 16, stride = a.Hkv * D, row = nc * 16;
  const C* keys = static_cast<const C*>(a.k) + g * D;
  const C* values = static_cast<const C*>(a.v) + g * D;
  s.q.assign(size_t(nt * Q * row), 0.0f);  // zero-padded to whole chunks
  s.o.assign(size_t(nt * Q * row), 0.0f);
  s.p.resize(size_t(Q * kKeyBlock));
  s.kt.resize(size_t(D * kKeyBlock));
  s.m.assign(size_t(nt * Q), -INFINITY);
  s.l.assign(size_t(nt * Q), 0.0f);
  int64_t lo = INT64_MAX, hi = 0;
  for (int64_t u = 0; u < nt; ++u) {
    const int64_t t = t0 + u;
    lo = std::min(lo, first_key(a, t)), hi = std::max<int64_t>(hi, a.positions[t] + 1);
    for (int i = 0; i < Q; ++i) {
      const float* q = a.q + (t * a.Hq + h0 + i) * D;
      float* qs = s.q.data() + (u * Q + i) * row;
      // Against an f16 cache, q . k takes q rounded to f16, as ggml computes it: it multiplies
      // an F16 matrix (the cached k) by F32 activations (q) through their F16 copy.
      if (a.f16) for (int64_t e = 0; e < D; ++e) qs[e] = half_to_float(float_to_half(q[e]));
      else std::memcpy(qs, q, 4 * size_t(D));
    }
  }
  const bool convert = std::is_same_v<C, uint16_t> && nt > 1;
  if (convert) s.v.resize(size_t(kKeyBlock * D));
  // Rows are asked for kRowsAhead ahead of the rows being turned; with several tokens, each
  // token also asks for a slice of the next block while it works on this one.
  const Ahead ahead{reinterpret_cast<const char*>(keys), reinterpret_cast<const char*>(values),
                    stride * int64_t(sizeof(C)), D * int64_t(sizeof(C)), 0, hi};
  const int64_t slice = nt > 1 ? (kKeyBlock + nt - 1) / nt : 0;
  for (int64_t b = lo / kKeyBlock * kKeyBlock; b < hi; b += kKeyBlock) {
    const int64_t bb = std::max(b, lo), be = std::min(b + kKeyBlock, hi);  // the rows any token reads
    for (int64_t j = bb; j < be; j += 8) {
      const int64_t n = std::min<int64_t>(8, be - j);
      for (int64_t r = j; r < j + n; ++r) ahead.fetch(r + kRowsAhead);
      turn_keys<V, C>(keys + j * stride, stride, n, D, s.kt.data() + (j - b));
      if (convert)
        for (int64_t r = j; r < j + n; ++r)
          for (int64_t c = 0; c < nc; ++c) {
            const int w = int(std::min<int64_t>(16, D - 16 * c));
            store_n<V>(s.v.data() + (r - b) * D + 16 * c, load_n<V>(reinterpret_cast<const uint16_t*>(values) + r * stride + 16 * c, w), w);
          }
    }
    for (int64_t u = 0; u < nt; ++u) {
      const int64_t t = t0 + u, jb = std::max(b, first_key(a, t)), je = std::min<int64_t>(b + kKeyBlock, a.positions[t] + 1);
      if (jb >= je) continue;
      float *qs = s.q.data() + u * Q * row, *o = s.o.data() + u * Q * row, *m = s.m.data() + u * Q, *l = s.l.data() + u * Q;
      Ahead next = ahead;
      next.from = b + kKeyBlock + u * slice, next.end = std::min(hi, next.from + slice);
      if (convert)
        fold_block<V, float, Q>(args, s.kt.data(), jb - b, s.v.data() + (jb - b) * D, D, je - jb, next, qs, o, row, m, l, s.p.data());
      else
        fold_block<V, C, Q>(args, s.kt.data(), jb - b, values + jb * stride, stride, je - jb, next, qs, o, row, m, l, s.p.data());
    }
  }
  for (int64_t u = 0; u < nt; ++u)
    for (int i = 0; i < Q; ++i) {
      const float* o = s.o.data() + (u * Q + i) * row;
      const Vec<V> inv = V::set1(1.0f / s.l[size_t(u * Q + i)]);
      float* out = a.out + ((t0 + u) * a.Hq + h0 + i) * D;
      for (int64_t c = 0; c < nc; ++c) store_n<V>(out + 16 * c, V::mul(V::load(o + 16 * c), inv), int(std::min<int64_t>(16, D - 16 * c)));
    }
}

template <class V, class C>
void attend_heads(const AttentionArgs& args, int64_t t0, int64_t nt, int64_t g, int64_t h0, int q, AttentionScratch& s) {
  switch (q) {
    case 1: return attend<V, C, 1>(args, t0, nt, g, h0, s);
    case 2: return attend<V, C, 2>(args, t0, nt, g, h0, s);
    case 3: return attend<V, C, 3>(args, t0, nt, g, h0, s);
    default: return attend<V, C, 4>(args, t0, nt, g, h0, s);
  }
}

// Work items [begin, end): item i is (block of `tokens` tokens, KV head, chunk of that head's
// queries), chunk fastest.
template <class V> void attention_items(const AttentionArgs& args, int64_t begin, int64_t end) {
  thread_local AttentionScratch scratch;
  const Attention& a = args.a;
  const int64_t group = a.Hq / a.Hkv, chunks = (group + args.chunk - 1) / args.chunk;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t c = i % chunks, g = i / chunks % a.Hkv, t0 = i / chunks / a.Hkv * args.tokens;
    const int64_t h0 = g * group + c * args.chunk, nt = std::min(args.tokens, a.T - t0);
    const int q = int(std::min(args.chunk, group - c * args.chunk));
    if (a.f16) attend_heads<V, uint16_t>(args, t0, nt, g, h0, q, scratch);
    else attend_heads<V, float>(args, t0, nt, g, h0, q, scratch);
  }
}

// ------------------------------------------------------------------ LM head and embedding rows

// Each row type decodes one block of a row (kBlock elements, a multiple of 16) into 16-float
// chunks (`chunk`), and `at` is one element, for a float row's tail. The LM head takes the
// quantized types' codes and scales from the decoded block directly (head_block_int).
struct RowF32 {
  static constexpr int64_t kBlock = 16, kBytes = 64;
  struct Block {
    const float* p;
    template <class V> void decode(const uint8_t* b) { p = reinterpret_cast<const float*>(b); }
    template <class V> Vec<V> chunk(int) const { return V::load(p); }
  };
  static float at(const uint8_t* row, int64_t k) { float f; std::memcpy(&f, row + 4 * k, 4); return f; }
};

struct RowF16 {
  static constexpr int64_t kBlock = 16, kBytes = 32;
  struct Block {
    const uint16_t* p;
    template <class V> void decode(const uint8_t* b) { p = reinterpret_cast<const uint16_t*>(b); }
    template <class V> Vec<V> chunk(int) const { return V::load_f16(p); }
  };
  static float at(const uint8_t* row, int64_t k) {
    uint16_t h;
    std::memcpy(&h, row + 2 * k, 2);
    return half_to_float(h);
  }
};

// Q8_0: blocks of 32, 34 bytes: f16 d, then 32 int8 q; value = q * d.
struct RowQ8_0 {
  static constexpr int64_t kBlock = 32, kBytes = 34;
  struct Block {
    const int8_t* q;
    float d;
    template <class V> void decode(const uint8_t* b) {
      d = V::half(b);
      q = reinterpret_cast<const int8_t*>(b + 2);
    }
    template <class V> Vec<V> chunk(int c) const { return V::mul(V::load_i8(q + 16 * c), V::set1(d)); }
    const int8_t* codes() const { return q; }
  };
};

// Q6_K: blocks of 256, 210 bytes: ql[128], qh[64], int8 scales[16], f16 d. In half h (128
// elements), element 128h + r takes its low 4 bits from ql[64h + r % 64] (bits 0-3 for r < 64,
// else 4-7) and its high 2 bits from qh[32h + r % 32] at bit 2 (r / 32); value =
// (d * scales[e / 16]) * (q - 32), the product order of gguf.quants.
struct RowQ6_K {
  static constexpr int64_t kBlock = 256, kBytes = 210;
  struct Block {
    uint8_t u[256];  // q, unsigned: the head subtracts 32 once per 16 elements (HeadArgs::xsum)
    float scale[16];
    template <class V> void decode(const uint8_t* b) {
      // 32 codes per vector, in 16-bit lanes (x86 has no byte shifts), masking off what crosses
      // from the neighbouring byte; qh's 32 bytes feed all four quarters of a half, each shifted
      // by one amount (a per-lane shift count has no AVX2 instruction: it would run scalar).
      using u16x16 = uint16_t __attribute__((vector_size(32)));
      for (int h = 0; h < 2; ++h) {
        u16x16 lo0, lo1, qh;
        std::memcpy(&lo0, b + 64 * h, 32);
        std::memcpy(&lo1, b + 64 * h + 32, 32);
        std::memcpy(&qh, b + 128 + 32 * h, 32);
        const u16x16 out[4] = {(lo0 & 0x0f0f) | (qh << 4 & 0x3030), (lo1 & 0x0f0f) | (qh << 2 & 0x3030),
                               (lo0 >> 4 & 0x0f0f) | (qh & 0x3030), (lo1 >> 4 & 0x0f0f) | (qh >> 2 & 0x3030)};
        std::memcpy(u + 128 * h, out, 128);
      }
      V::store(scale, V::mul(V::set1(V::half(b + 208)), V::load_i8(reinterpret_cast<const int8_t*>(b + 192))));
    }
    template <class V> Vec<V> chunk(int c) const {
      return V::mul(V::set1(scale[c]), V::sub(V::load_i8(reinterpret_cast<const int8_t*>(u + 16 * c)), V::set1(32.0f)));
    }
  };
};

template <class V, class Row> void dequantize_row(const uint8_t* row, int64_t D, float* out) {
  typename Row::Block blk;
  int64_t b = 0;
  for (; (b + 1) * Row::kBlock <= D; ++b) {
    blk.template decode<V>(row + b * Row::kBytes);
    for (int c = 0; c < Row::kBlock / 16; ++c) V::store(out + b * Row::kBlock + 16 * c, blk.template chunk<V>(c));
  }
  if constexpr (Row::kBlock == 16)  // float rows only: quantized D is a multiple of the block
    for (int64_t k = b * 16; k < D; ++k) out[k] = Row::at(row, k);
}

struct HeadArgs {
  const float* x;  // [T, D]
  // For the quantized types, x[t] = dx[t] * xq[t] (quantize_int16); Q6_K takes xq as
  // 256 xh + xl and needs -32 * the sum of each 16 of xq (xsum).
  const int16_t* xq;  // [T, D]
  const int8_t* xh;   // [T, D]
  const uint8_t* xl;  // [T, D]
  const float* xsum;  // [T, D / 16]
  const int16_t* xeo;  // [T, D]: xq with each 32 reordered, the even elements then the odd (Q6_K, AVX2)
  const float* dx;    // [T]
  int64_t T, D;
  const uint8_t* w;  // [vocab] rows of row_bytes
  int64_t vocab, row_bytes;
  WeightType type;
  float* out;  // [T, V]
};

constexpr int kHeadTokens = 8;   // tokens per pass: each weight load feeds up to 8 x 4 FMAs (a batch of
                                 // 8 decoding streams reads the head once)
constexpr int64_t kGroup = 64;   // rows kept in L2 while every token passes over them

// The next block of rows (decode only; null otherwise), prefetched into L2 a share per step
// of `steps`, so it arrives while this block computes.
struct AheadPrefetch {
  const uint8_t* ahead;
  int64_t bytes, step;
  AheadPrefetch(const uint8_t* a, int64_t n, int64_t steps)
      : ahead(a), bytes(n), step(a && steps ? ((n + steps - 1) / steps + 63) & ~int64_t(63) : 0) {}
  void operator()(int64_t s) const {
    if (ahead)
      for (int64_t o = s * step; o < std::min((s + 1) * step, bytes); o += 64) __builtin_prefetch(ahead + o, 0, 1);
  }
};

// out[t0 .. t0+NT) x [r0, r0+NR): NR rows (at `rows`, row_bytes apart) against NT tokens,
// NR x NT accumulators sharing each load. `ahead` (decode only) is the next block of rows:
// prefetched a little per step, so it arrives while this block computes.
template <class V, class Row, int NR, int NT>
void head_block(const HeadArgs& h, const uint8_t* rows, int64_t row_bytes, int64_t r0, int64_t t0,
                const uint8_t* ahead, int64_t ahead_bytes) {
  using R = Vec<V>;
  constexpr int kChunks = int(Row::kBlock / 16);
  const int64_t D = h.D, blocks = D / Row::kBlock, steps = blocks * kChunks;
  const AheadPrefetch prefetch{ahead, ahead_bytes, steps};
  const float* x = h.x + t0 * D;
  R acc[NT][NR];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < NR; ++r) acc[t][r] = V::zero();
  for (int64_t b = 0; b < blocks; ++b) {
    typename Row::Block blk[NR];
    for (int r = 0; r < NR; ++r) blk[r].template decode<V>(rows + r * row_bytes + b * Row::kBytes);
    for (int c = 0; c < kChunks; ++c) {
      const int64_t s = b * kChunks + c;
      prefetch(s);
      R w[NR];
      for (int r = 0; r < NR; ++r) w[r] = blk[r].template chunk<V>(c);
      for (int t = 0; t < NT; ++t) {
        const R xv = V::load(x + t * D + 16 * s);
        for (int r = 0; r < NR; ++r) acc[t][r] = V::fma(w[r], xv, acc[t][r]);
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < NR; ++r) {
      float sum = V::sum(acc[t][r]);
      if constexpr (Row::kBlock == 16)
        for (int64_t k = 16 * steps; k < D; ++k) sum += Row::at(rows + r * row_bytes, k) * x[t * D + k];
      h.out[(t0 + t) * h.vocab + r0 + r] = sum;
    }
}

// The same for Q8_0 / Q6_K rows, from int16 activations, in exact integer dot products of 32 /
// 64 elements, converted and scaled once: a float product per element would need twice the
// instructions, more than the row's bytes take to arrive. Q8_0: per 32 elements the codes are
// widened once for every token, then one pairwise int16 product each. Q6_K: per 64 elements two
// VNNI byte products, of the 6-bit codes with x's high and low bytes.
template <class V, class Row, int NR, int NT>
void head_block_int(const HeadArgs& h, const uint8_t* rows, int64_t row_bytes, int64_t r0, int64_t t0,
                    const uint8_t* ahead, int64_t ahead_bytes) {
  using R = Vec<V>;
  constexpr bool kQ6 = std::is_same_v<Row, RowQ6_K>;
  constexpr int kStep = kQ6 ? 64 : 32, kChunks = int(Row::kBlock / kStep);
  const int64_t D = h.D, blocks = D / Row::kBlock, steps = blocks * kChunks;
  const AheadPrefetch prefetch{ahead, ahead_bytes, steps};
  R acc[NT][NR];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < NR; ++r) acc[t][r] = V::zero();
  for (int64_t b = 0; b < blocks; ++b) {
    typename Row::Block blk[NR];
    for (int r = 0; r < NR; ++r) blk[r].template decode<V>(rows + r * row_bytes + b * Row::kBytes);
    for (int c = 0; c < kChunks; ++c) {
      const int64_t s = b * kChunks + c, k = s * kStep;
      prefetch(s);
      for (int r = 0; r < NR; ++r) {
        if constexpr (kQ6) {
          const R scale = V::spread4(blk[r].scale + 4 * c);
          for (int t = 0; t < NT; ++t) {
            const int64_t o = (t0 + t) * D + k;
            acc[t][r] = V::fma(scale, V::dot_split(blk[r].u + kStep * c, h.xh + o, h.xl + o), acc[t][r]);
          }
        } else {
          const typename V::W q = V::widen_i8(blk[r].codes() + kStep * c);
          const R scale = V::set1(blk[r].d);
          for (int t = 0; t < NT; ++t) acc[t][r] = V::fma(scale, V::dot_pairs(h.xq + (t0 + t) * D + k, q), acc[t][r]);
        }
      }
    }
    if constexpr (kQ6)  // the codes' offset: -32 * scale * (sum of x) for each 16 elements
      for (int r = 0; r < NR; ++r) {
        const R scale = V::load(blk[r].scale);
        for (int t = 0; t < NT; ++t) acc[t][r] = V::fma(scale, V::load(h.xsum + ((t0 + t) * D + b * 256) / 16), acc[t][r]);
      }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < NR; ++r) h.out[(t0 + t) * h.vocab + r0 + r] = V::sum(acc[t][r]) * h.dx[t0 + t];
}

#ifdef TRITLM_X86
// Q6_K on AVX2: the integer sums of head_block_int, lane for lane, without its byte products (two
// vpmaddubsw for x's high and low bytes, two vpmaddwd to widen, per 32 codes) and without 16-bit
// shifts (one port on Zen 1-2): codes go straight to 16-bit lanes, even and odd elements apart,
// against x reordered the same way once per token (HeadArgs::xeo), so two vpmaddwd give each
// 32-bit lane its 4 consecutive products. A qh nibble (two quarters' 2-bit codes) becomes code
// bits 4-5 through a vpshufb lookup.
//
// Quarter q's codes (elements 32q .. 32q + 31 of a half) as 16-bit lanes: code[q][0] the even
// elements, code[q][1] the odd ones.
struct Q6kHalf { __m256i code[4][2]; };

TRITLM_AVX2 inline Q6kHalf q6k_decode_half(const uint8_t* block, int half) {
  const __m256i nibble = _mm256_set1_epi8(0x0f), low_byte = _mm256_set1_epi16(0x00ff);
  const __m256i first = _mm256_setr_epi8(0, 16, 32, 48, 0, 16, 32, 48, 0, 16, 32, 48, 0, 16, 32, 48,  //
                                         0, 16, 32, 48, 0, 16, 32, 48, 0, 16, 32, 48, 0, 16, 32, 48);
  const __m256i second = _mm256_setr_epi8(0, 0, 0, 0, 16, 16, 16, 16, 32, 32, 32, 32, 48, 48, 48, 48,  //
                                          0, 0, 0, 0, 16, 16, 16, 16, 32, 32, 32, 32, 48, 48, 48, 48);
  const __m256i odd = _mm256_setr_epi8(1, -1, 3, -1, 5, -1, 7, -1, 9, -1, 11, -1, 13, -1, 15, -1,  // byte 2k + 1
                                       1, -1, 3, -1, 5, -1, 7, -1, 9, -1, 11, -1, 13, -1, 15, -1);  // to lane k
  const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64 * half));
  const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64 * half + 32));
  const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 128 + 32 * half));
  const __m256i qh_low = _mm256_and_si256(qh, nibble), qh_high = _mm256_and_si256(_mm256_srli_epi16(qh, 4), nibble);
  const __m256i bytes[4] = {
      _mm256_or_si256(_mm256_and_si256(ql0, nibble), _mm256_shuffle_epi8(first, qh_low)),
      _mm256_or_si256(_mm256_and_si256(ql1, nibble), _mm256_shuffle_epi8(second, qh_low)),
      _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), nibble), _mm256_shuffle_epi8(first, qh_high)),
      _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), nibble), _mm256_shuffle_epi8(second, qh_high))};
  Q6kHalf h;
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) h.code[q][0] = _mm256_and_si256(bytes[q], low_byte), h.code[q][1] = _mm256_shuffle_epi8(bytes[q], odd);
  return h;
}

// The 16 lanes of 4-element sums of quarters q, q + 1 against x (xeo order).
TRITLM_AVX2 inline Avx2::R q6k_sums(const Q6kHalf& h, int q, const int16_t* x) {
  const __m256i* v = reinterpret_cast<const __m256i*>(x);
  const __m256i lo = _mm256_add_epi32(_mm256_madd_epi16(h.code[q][0], _mm256_loadu_si256(v)),
                                      _mm256_madd_epi16(h.code[q][1], _mm256_loadu_si256(v + 1)));
  const __m256i hi = _mm256_add_epi32(_mm256_madd_epi16(h.code[q + 1][0], _mm256_loadu_si256(v + 2)),
                                      _mm256_madd_epi16(h.code[q + 1][1], _mm256_loadu_si256(v + 3)));
  return {_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi)};
}

template <int NR, int NT>
TRITLM_AVX2 void head_block_q6k_avx2(const HeadArgs& h, const uint8_t* rows, int64_t row_bytes, int64_t r0,
                                     int64_t t0, const uint8_t* ahead, int64_t) {
  using V = Avx2;
  const int64_t D = h.D, blocks = D / 256;
  const int16_t* xeo = h.xeo + t0 * D;
  for (int r = 0; r < NR; ++r) {  // a row at a time: NT accumulators stay in registers
    const uint8_t* row = rows + r * row_bytes;
    Avx2::R acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = V::zero();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* block = row + b * RowQ6_K::kBytes;
      if (ahead)  // the same block NR rows on, into L1
        for (int o = 0; o < RowQ6_K::kBytes; o += 64) __builtin_prefetch(block + NR * row_bytes + o, 0, 3);
      const Avx2::R scales = V::mul(V::set1(V::half(block + 208)), V::load_i8(reinterpret_cast<const int8_t*>(block + 192)));
      alignas(32) float scale[16];
      V::store(scale, scales);
      __asm__ volatile("" ::: "memory");  // spread4 loads the scales: no lane shuffles out of registers
#pragma GCC unroll 2
      for (int half = 0; half < 2; ++half) {
        const Q6kHalf codes = q6k_decode_half(block, half);
        const Avx2::R s0 = V::spread4(scale + 8 * half), s1 = V::spread4(scale + 8 * half + 4);
        for (int t = 0; t < NT; ++t) {  // elements 128 half + 64c .. + 63: quarters 2c, 2c + 1
          const int16_t* x = xeo + t * D + b * 256 + 128 * half;
          acc[t] = V::fma(s0, q6k_sums(codes, 0, x), acc[t]);
          acc[t] = V::fma(s1, q6k_sums(codes, 2, x + 64), acc[t]);
        }
      }
      for (int t = 0; t < NT; ++t)  // the codes' offset, as head_block_int applies it
        acc[t] = V::fma(scales, V::load(h.xsum + ((t0 + t) * D + b * 256) / 16), acc[t]);
    }
    for (int t = 0; t < NT; ++t) h.out[(t0 + t) * h.vocab + r0 + r] = V::sum(acc[t]) * h.dx[t0 + t];
  }
}

// Q6_K on AVX-512: head_block_int's arithmetic, operation for operation, with the codes decoded
// into registers. Decoded through memory (RowQ6_K::Block), each 64-byte load of codes spans two
// 32-byte stores, which store forwarding cannot serve, and the head ran compute-bound at ~10 GB/s
// per core. Chunk 2h + j of a block (64 codes): ql[64h .. 64h + 63] nibble j, and qh[32h ..
// 32h + 31] at bits 2j (first 32 codes) and 2j + 2 (last 32), each moved to bits 4-5 by one
// 64-bit shift per 256-bit half.
TRITLM_AVX512 inline void q6k_decode_avx512(const uint8_t* block, __m512i codes[4]) {
  const __m512i nibble = _mm512_set1_epi8(0x0f), two_bits = _mm512_set1_epi8(0x30);
  const __m512i up = _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4), down = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
  for (int half = 0; half < 2; ++half) {
    const __m512i ql = _mm512_loadu_si512(block + 64 * half);
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 128 + 32 * half)));
    codes[2 * half] = _mm512_or_si512(_mm512_and_si512(ql, nibble), _mm512_and_si512(_mm512_sllv_epi64(qh, up), two_bits));
    codes[2 * half + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), nibble),
                                          _mm512_and_si512(_mm512_srlv_epi64(qh, down), two_bits));
  }
}

template <int NR, int NT>
TRITLM_AVX512 void head_block_q6k_avx512(const HeadArgs& h, const uint8_t* rows, int64_t row_bytes, int64_t r0,
                                         int64_t t0, const uint8_t* ahead, int64_t) {
  using V = Avx512;
  const int64_t D = h.D, blocks = D / 256;
  const __m512i quarter = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  for (int r = 0; r < NR; ++r) {  // a row at a time: NT accumulators stay in registers
    const uint8_t* row = rows + r * row_bytes;
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = V::zero();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* block = row + b * RowQ6_K::kBytes;
      if (ahead)  // the same block NR rows on, into L1
        for (int o = 0; o < RowQ6_K::kBytes; o += 64) __builtin_prefetch(block + NR * row_bytes + o, 0, 3);
      __m512i codes[4];
      q6k_decode_avx512(block, codes);
      const __m512 scales = V::mul(V::set1(V::half(block + 208)), V::load_i8(reinterpret_cast<const int8_t*>(block + 192)));
      for (int c = 0; c < 4; ++c) {  // lane i of chunk c: scale 4c + i / 4, as spread4
        const __m512 scale = _mm512_permutexvar_ps(_mm512_add_epi32(quarter, _mm512_set1_epi32(4 * c)), scales);
        for (int t = 0; t < NT; ++t) {
          const int64_t o = (t0 + t) * D + b * 256 + 64 * c;
          const __m512i high = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[c], _mm512_loadu_si512(h.xh + o));
          const __m512i sums = _mm512_dpbusd_epi32(_mm512_slli_epi32(high, 8), _mm512_loadu_si512(h.xl + o), codes[c]);
          acc[t] = V::fma(scale, _mm512_cvtepi32_ps(sums), acc[t]);
        }
      }
      for (int t = 0; t < NT; ++t)  // the codes' offset, as head_block_int applies it
        acc[t] = V::fma(scales, V::load(h.xsum + ((t0 + t) * D + b * 256) / 16), acc[t]);
    }
    for (int t = 0; t < NT; ++t) h.out[(t0 + t) * h.vocab + r0 + r] = V::sum(acc[t]) * h.dx[t0 + t];
  }
}
#endif

// NR rows x NT tokens: in float for F32 / F16 rows, in integers for the quantized ones.
template <class V, class Row, int NR, int NT>
void head_rows_tokens(const HeadArgs& h, const uint8_t* rows, int64_t row_bytes, int64_t r0, int64_t t0,
                      const uint8_t* ahead, int64_t ahead_bytes) {
#ifdef TRITLM_X86
  if constexpr (std::is_same_v<V, Avx2> && std::is_same_v<Row, RowQ6_K>)
    return head_block_q6k_avx2<NR, NT>(h, rows, row_bytes, r0, t0, ahead, ahead_bytes);
  if constexpr (std::is_same_v<V, Avx512> && std::is_same_v<Row, RowQ6_K>)
    return head_block_q6k_avx512<NR, NT>(h, rows, row_bytes, r0, t0, ahead, ahead_bytes);
#endif
  if constexpr (Row::kBlock > 16) head_block_int<V, Row, NR, NT>(h, rows, row_bytes, r0, t0, ahead, ahead_bytes);
  else head_block<V, Row, NR, NT>(h, rows, row_bytes, r0, t0, ahead, ahead_bytes);
}

template <class V, class Row, int NR>
void head_block_tokens(int nt, const HeadArgs& h, const uint8_t* rows, int64_t row_bytes, int64_t r0, int64_t t0,
                       const uint8_t* ahead, int64_t ahead_bytes) {
  switch (nt) {
    case 1: return head_rows_tokens<V, Row, NR, 1>(h, rows, row_bytes, r0, t0, ahead, ahead_bytes);
    case 2: return head_rows_tokens<V, Row, NR, 2>(h, rows, row_bytes, r0, t0, ahead, ahead_bytes);
    case 3: return head_rows_tokens<V, Row, NR, 3>(h, rows, row_bytes, r0, t0, ahead, ahead_bytes);
    case 4: return head_rows_tokens<V, Row, NR, 4>(h, rows, row_bytes, r0, t0, ahead, ahead_bytes);
    case 5: return head_rows_tokens<V, Row, NR, 5>(h, rows, row_bytes, r0, t0, ahead, ahead_bytes);
    case 6: return head_rows_tokens<V, Row, NR, 6>(h, rows, row_bytes, r0, t0, ahead, ahead_bytes);
    case 7: return head_rows_tokens<V, Row, NR, 7>(h, rows, row_bytes, r0, t0, ahead, ahead_bytes);
    default: return head_rows_tokens<V, Row, NR, 8>(h, rows, row_bytes, r0, t0, ahead, ahead_bytes);
  }
}

// Rows [begin, end) for every token; `w` points at row `begin`. Groups of rows stay in L2 while
// all tokens pass over them, in blocks of 4 rows x up to 8 tokens (measured: 2 or 8 rows are
// slower, though 8 x 4 accumulators spill).
template <class V, class Row>
void head_slice(const HeadArgs& h, const uint8_t* w, int64_t row_bytes, int64_t begin, int64_t end) {
  constexpr int NR = 4;
  const bool decode = h.T <= kHeadTokens;  // one pass over the rows: prefetch ahead of it
  for (int64_t g0 = begin; g0 < end; g0 += kGroup) {
    const int64_t g1 = std::min(end, g0 + kGroup);
    for (int64_t t0 = 0; t0 < h.T; t0 += kHeadTokens) {
      const int nt = int(std::min<int64_t>(kHeadTokens, h.T - t0));
      int64_t r0 = g0;
      for (; r0 + NR <= g1; r0 += NR) {
        const uint8_t* rows = w + (r0 - begin) * row_bytes;
        const int64_t ahead_rows = decode ? std::min<int64_t>(NR, end - r0 - NR) : 0;
        head_block_tokens<V, Row, NR>(nt, h, rows, row_bytes, r0, t0, ahead_rows > 0 ? rows + NR * row_bytes : nullptr,
                                      ahead_rows * row_bytes);
      }
      for (; r0 < g1; ++r0)
        head_block_tokens<V, Row, 1>(nt, h, w + (r0 - begin) * row_bytes, row_bytes, r0, t0, nullptr, 0);
    }
  }
}

template <class V> void head_rows(const HeadArgs& h, int64_t begin, int64_t end) {
  const uint8_t* w = h.w + begin * h.row_bytes;
  switch (h.type) {
    case WeightType::F32: return head_slice<V, RowF32>(h, w, h.row_bytes, begin, end);
    case WeightType::F16: return head_slice<V, RowF16>(h, w, h.row_bytes, begin, end);
    case WeightType::Q8_0: return head_slice<V, RowQ8_0>(h, w, h.row_bytes, begin, end);
    case WeightType::Q6_K: return head_slice<V, RowQ6_K>(h, w, h.row_bytes, begin, end);
  }
}

struct EmbedArgs {
  const uint8_t* w;
  int64_t D, row_bytes;
  WeightType type;
  const int32_t* ids;
  int64_t T;
  float* out;
};

template <class V> void embed_rows(const EmbedArgs& e) {
  for (int64_t t = 0; t < e.T; ++t) {
    const uint8_t* row = e.w + e.ids[t] * e.row_bytes;
    float* out = e.out + t * e.D;
    switch (e.type) {
      case WeightType::F32: dequantize_row<V, RowF32>(row, e.D, out); break;
      case WeightType::F16: dequantize_row<V, RowF16>(row, e.D, out); break;
      case WeightType::Q8_0: dequantize_row<V, RowQ8_0>(row, e.D, out); break;
      case WeightType::Q6_K: dequantize_row<V, RowQ6_K>(row, e.D, out); break;
    }
  }
}

// ------------------------------------------------------------------- entry points of each ISA

struct OpTable {
  void (*rms_norm)(const NormArgs&, int64_t, int64_t);
  void (*to_f16)(const float*, uint16_t*, int64_t);
  void (*gated)(const GatedArgs&, int64_t, int64_t);
  void (*attention)(const AttentionArgs&, int64_t, int64_t);
  void (*head)(const HeadArgs&, int64_t, int64_t);
  void (*embed)(const EmbedArgs&);
};

// ATTR compiles the entry points for one ISA, and flatten inlines everything below them (the
// generic templates and V's methods), so that is compiled for it too.
#define TRITLM_OP_TABLE(NAME, V, ATTR)                                                                         \
  ATTR __attribute__((flatten)) void NAME##_rms_norm(const NormArgs& a, int64_t b, int64_t e) {               \
    rms_norm_rows<V>(a, b, e);                                                                                 \
  }                                                                                                            \
  ATTR __attribute__((flatten)) void NAME##_to_f16(const float* s, uint16_t* d, int64_t n) { to_f16<V>(s, d, n); } \
  ATTR __attribute__((flatten)) void NAME##_gated(const GatedArgs& a, int64_t b, int64_t e) {                 \
    gated_range<V>(a, b, e);                                                                                   \
  }                                                                                                            \
  ATTR __attribute__((flatten)) void NAME##_attention(const AttentionArgs& a, int64_t b, int64_t e) {         \
    attention_items<V>(a, b, e);                                                                               \
  }                                                                                                            \
  ATTR __attribute__((flatten)) void NAME##_head(const HeadArgs& h, int64_t b, int64_t e) { head_rows<V>(h, b, e); } \
  ATTR __attribute__((flatten)) void NAME##_embed(const EmbedArgs& a) { embed_rows<V>(a); }                    \
  const OpTable NAME##_ops = {NAME##_rms_norm,  NAME##_to_f16, NAME##_gated,                                  \
                              NAME##_attention, NAME##_head,   NAME##_embed};

TRITLM_OP_TABLE(portable, Portable, )
#ifdef TRITLM_X86
TRITLM_OP_TABLE(avx2, Avx2, TRITLM_AVX2)
TRITLM_OP_TABLE(avx512, Avx512, TRITLM_AVX512)
#endif
#ifdef TRITLM_NEON
TRITLM_OP_TABLE(neon, Neon, )
#endif

const OpTable& ops_for(Isa isa) {
#ifdef TRITLM_X86
  if (isa == Isa::avx512) return avx512_ops;
  if (isa == Isa::avx2) return avx2_ops;
#endif
#ifdef TRITLM_NEON
  if (isa == Isa::neon) return neon_ops;
#endif
  (void)isa;
  return portable_ops;
}

// Threads for `work` units of roughly equal cost: one per `min_work` units, at most n_threads
// (waking the pool costs microseconds, more than a small op).
int threads_for(int64_t work, int64_t min_work, int n_threads) {
  return int(std::max<int64_t>(1, std::min<int64_t>(n_threads, work / min_work)));
}

}  // namespace

// ---------------------------------------------------------------------------------- the API

Isa isa_named(const std::string& name) {
  kernels_named(name);  // throws unless this CPU runs it
#ifdef TRITLM_X86
  if (name == "avx512") return Isa::avx512;
  if (name == "avx2") return __builtin_cpu_supports("f16c") ? Isa::avx2 : Isa::portable;
#endif
#ifdef TRITLM_NEON
  if (name == "i8mm" || name == "dotprod" || name == "neon") return Isa::neon;
#endif
  return Isa::portable;
}

bool weight_type_named(const std::string& name, WeightType* type) {
  static const std::pair<const char*, WeightType> names[] = {
      {"F32", WeightType::F32}, {"F16", WeightType::F16}, {"Q8_0", WeightType::Q8_0}, {"Q6_K", WeightType::Q6_K}};
  for (const auto& [n, t] : names)
    if (name == n) {
      *type = t;
      return true;
    }
  return false;
}

int64_t block_elements(WeightType type) {
  return type == WeightType::Q8_0 ? 32 : type == WeightType::Q6_K ? 256 : 1;
}

int64_t block_bytes(WeightType type) {
  switch (type) {
    case WeightType::F32: return 4;
    case WeightType::F16: return 2;
    case WeightType::Q8_0: return 34;
    case WeightType::Q6_K: return 210;
  }
  return 0;
}

void rms_norm(Isa isa, const float* x, const float* weight, int64_t T, int64_t D, double eps, float* out,
              int n_threads) {
  const NormArgs a{x, weight, D, eps, out};
  const OpTable& ops = ops_for(isa);
  parallel_for(threads_for(T * D, 1 << 15, n_threads), T, [&](int64_t b, int64_t e) { ops.rms_norm(a, b, e); });
}

namespace {
// theta^(-2i/D) for i < D/2, computed once per (D, theta): a model uses one or two.
std::shared_ptr<const std::vector<double>> inverse_frequencies(int64_t D, double theta) {
  static std::mutex mutex;
  static std::map<std::pair<int64_t, double>, std::shared_ptr<const std::vector<double>>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = cache[{D, theta}];
  if (!entry) {
    auto f = std::make_shared<std::vector<double>>(size_t(D / 2));
    for (int64_t i = 0; i < D / 2; ++i) (*f)[size_t(i)] = std::pow(theta, -double(2 * i) / double(D));
    entry = f;
  }
  return entry;
}
}  // namespace

void rope(float* x, const int32_t* positions, int64_t T, int64_t H, int64_t D, double theta, bool neox,
          int n_threads) {
  const auto freq = inverse_frequencies(D, theta);
  const int64_t half = D / 2;
  // Small and dominated by cos/sin (once per token and pair, shared by the heads): plain C++.
  parallel_for(threads_for(T * H * D, 1 << 15, n_threads), T, [&](int64_t begin, int64_t end) {
    std::vector<float> cs(static_cast<size_t>(D));  // cos of each pair, then sin
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < half; ++i) {
        const double angle = double(positions[t]) * (*freq)[size_t(i)];
        cs[size_t(i)] = float(std::cos(angle));
        cs[size_t(half + i)] = float(std::sin(angle));
      }
      for (int64_t h = 0; h < H; ++h) {
        float* v = x + (t * H + h) * D;
        const int64_t step = neox ? 1 : 2, offset = neox ? half : 1;  // pair i: (i, i + D/2) or (2i, 2i + 1)
        for (int64_t i = 0; i < half; ++i) {
          float& a = v[i * step];
          float& b = v[i * step + offset];
          const float c = cs[size_t(i)], s = cs[size_t(half + i)], a0 = a, b0 = b;
          a = a0 * c - b0 * s;
          b = b0 * c + a0 * s;
        }
      }
    }
  });
}

void store_rows(Isa isa, const float* src, int64_t n, void* dst, bool f16) {
  if (f16) ops_for(isa).to_f16(src, static_cast<uint16_t*>(dst), n);
  else std::memcpy(dst, src, size_t(n) * 4);
}

void attention(Isa isa, const Attention& a, int n_threads) {
  const int64_t group = a.Hq / a.Hkv;
  // The query heads of one KV head share every key and value load, and the tokens of an item
  // every block read from memory; items get fewer tokens, then fewer heads, only when there
  // are too few of them to give every thread its pieces.
  int64_t tokens = std::min(a.T, kItemTokens), chunk = std::min<int64_t>(group, 4);
  auto items_for = [&](int64_t tb, int64_t c) { return (a.T + tb - 1) / tb * a.Hkv * ((group + c - 1) / c); };
  while (tokens > 1 && items_for(tokens, chunk) < int64_t(n_threads) * kPiecesPerThread) tokens = (tokens + 1) / 2;
  while (chunk > 1 && items_for(tokens, chunk) < n_threads) chunk = (chunk + 1) / 2;
  const int64_t n_items = items_for(tokens, chunk), chunks = (group + chunk - 1) / chunk;
  const AttentionArgs args{a, float(a.scale > 0 ? a.scale : 1.0 / std::sqrt(double(a.D))), chunk, tokens};

  // An item costs about the cache rows its tokens read: cut the items into contiguous runs of
  // equal cost (a prompt's late tokens see many more rows than its early ones).
  std::vector<int64_t> start(size_t(n_items) + 1, 0);
  for (int64_t i = 0; i < n_items; ++i) {
    int64_t cost = 0;
    for (int64_t t = i / chunks / a.Hkv * tokens, e = std::min(a.T, t + tokens); t < e; ++t)
      cost += a.positions[t] + 1 - first_key(a, t) + 8;  // + per-token overhead
    start[size_t(i) + 1] = start[size_t(i)] + cost;
  }
  const int64_t total = start.back();
  const int threads = threads_for(total * a.D * chunk, 1 << 16, std::min<int64_t>(n_threads, n_items));
  const int64_t shares = std::min<int64_t>(n_items, threads == 1 ? 1 : threads * kPiecesPerThread);
  std::vector<int64_t> bounds(size_t(shares) + 1);
  for (int64_t w = 0, i = 0; w <= shares; ++w) {  // share w: the items whose midpoint lies in it
    while (i < n_items && (start[size_t(i)] + start[size_t(i) + 1]) * shares < 2 * total * w) ++i;
    bounds[size_t(w)] = i;
  }
  bounds[size_t(shares)] = n_items;
  const OpTable& ops = ops_for(isa);
  parallel_for(threads, shares, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) ops.attention(args, bounds[size_t(w)], bounds[size_t(w) + 1]);
  });
}

bool activation_named(const std::string& name, Activation* activation) {
  if (name == "relu2") *activation = Activation::relu2;
  else if (name == "silu") *activation = Activation::silu;
  else if (name == "gelu_tanh") *activation = Activation::gelu_tanh;
  else return false;
  return true;
}

void gated(Isa isa, const float* gate, const float* up, int64_t n, Activation act, float* out, int n_threads) {
  const GatedArgs a{gate, up, out, act};
  const OpTable& ops = ops_for(isa);
  constexpr int64_t kUnit = 1024;  // slices start on whole vectors
  parallel_for(threads_for(n, 1 << 15, n_threads), (n + kUnit - 1) / kUnit,
               [&](int64_t b, int64_t e) { ops.gated(a, b * kUnit, std::min(e * kUnit, n)); });
}

float quantize_int16(const float* x, int64_t n, int16_t* q) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(x[i]));
  const float inv = m > 0.0f ? 32767.0f / m : 0.0f;
  for (int64_t i = 0; i < n; ++i) q[i] = int16_t(std::clamp(std::nearbyint(x[i] * inv), -32767.0f, 32767.0f));
  return m / 32767.0f;
}

void head_matmul(Isa isa, const float* x, int64_t T, int64_t D, const uint8_t* w, int64_t V, WeightType type,
                 float* out, int n_threads) {
  std::vector<int16_t> xq;
  std::vector<int8_t> xh;
  std::vector<uint8_t> xl;
  std::vector<int16_t> xeo;
  std::vector<float> dx, xsum;
  if (block_elements(type) > 1) {
    xq.resize(size_t(T * D));
    dx.resize(size_t(T));
    for (int64_t t = 0; t < T; ++t) dx[size_t(t)] = quantize_int16(x + t * D, D, xq.data() + t * D);
  }
  if (type == WeightType::Q6_K) {
    xh.resize(xq.size());
    xl.resize(xq.size());
    xsum.assign(xq.size() / 16, 0.0f);
    for (size_t i = 0; i < xq.size(); ++i) {
      xh[i] = int8_t(xq[i] >> 8);  // arithmetic shift: xq = 256 xh + xl, xl in [0, 256)
      xl[i] = uint8_t(xq[i] & 255);
      xsum[i / 16] -= 32.0f * float(xq[i]);  // exact: |sum| < 2^24
    }
    xeo.resize(xq.size());
    for (size_t i = 0; i < xq.size(); ++i) xeo[i / 32 * 32 + i % 2 * 16 + i % 32 / 2] = xq[i];
  }
  const HeadArgs h{x, xq.data(), xh.data(), xl.data(), xsum.data(), xeo.data(), dx.data(), T, D, w, V,
                   D / block_elements(type) * block_bytes(type), type, out};
  const OpTable& ops = ops_for(isa);
  constexpr int64_t kUnit = 16;  // rows per unit of work: slices hold whole 4-row blocks
  parallel_for(threads_for(T * V * D, 1 << 18, n_threads), (V + kUnit - 1) / kUnit,
               [&](int64_t b, int64_t e) { ops.head(h, b * kUnit, std::min(e * kUnit, V)); });
}

void embedding_rows(Isa isa, const uint8_t* w, int64_t D, WeightType type, const int32_t* ids, int64_t T,
                    float* out) {
  ops_for(isa).embed({w, D, D / block_elements(type) * block_bytes(type), type, ids, T, out});
}

}  // namespace ops
}  // namespace tritlm
