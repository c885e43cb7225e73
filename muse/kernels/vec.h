// The vector type every Muse CPU kernel is written against: VF holds L floats, where L is
// 16 (AVX-512), 8 (AVX2 + FMA + F16C) or 1 (no ISA flag: plain C++). Each instruction set
// is its own build of the same sources (see muse/quant.py), so these are compile-time
// choices, never run-time checks.
#pragma once

#include <cmath>
#include <cstdint>

#include <c10/util/Half.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#define MUSE_SIMD_256 1  // AVX2 integer ops are there in both vector builds
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
#define MUSE_VNNI 1  // the int8-activation dots use dpbusd
#endif
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace muse_vec {

// Flush-to-zero and denormals-are-zero on this thread while in scope. Training's gradients
// are small (1e-8) and meet factors that are (a saturated sigmoid's 1e-35): their products
// fall below 1.2e-38, where x86 arithmetic takes microcode assists, some 100x slower (GELU's
// backward ran 4x slower on such inputs). Flushed, they are 0, an error under 1.2e-38.
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

#ifdef MUSE_SIMD_256
inline float hsum256(__m256 a) {  // the sum of 8 lanes
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX512F__)
constexpr int L = 16;
using VF = __m512;
inline VF vzero() { return _mm512_setzero_ps(); }
inline VF vset1(float a) { return _mm512_set1_ps(a); }
inline VF vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, VF a) { _mm512_storeu_ps(p, a); }
inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF vadd(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF vsub(VF a, VF b) { return _mm512_sub_ps(a, b); }
inline VF vmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF vdiv(VF a, VF b) { return _mm512_div_ps(a, b); }
inline VF vmax(VF a, VF b) { return _mm512_max_ps(a, b); }
inline VF vmin(VF a, VF b) { return _mm512_min_ps(a, b); }
inline float vsum(VF a) { return _mm512_reduce_add_ps(a); }
inline float vhmax(VF a) { return _mm512_reduce_max_ps(a); }
inline VF vround(VF a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF vpow2i(VF n) {  // 2^n for integral n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int L = 8;
using VF = __m256;
inline VF vzero() { return _mm256_setzero_ps(); }
inline VF vset1(float a) { return _mm256_set1_ps(a); }
inline VF vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, VF a) { _mm256_storeu_ps(p, a); }
inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF vadd(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF vsub(VF a, VF b) { return _mm256_sub_ps(a, b); }
inline VF vmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF vdiv(VF a, VF b) { return _mm256_div_ps(a, b); }
inline VF vmax(VF a, VF b) { return _mm256_max_ps(a, b); }
inline VF vmin(VF a, VF b) { return _mm256_min_ps(a, b); }
inline float vsum(VF a) { return hsum256(a); }
inline float vhmax(VF a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline VF vround(VF a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF vpow2i(VF n) {  // 2^n for integral n in [-126, 127]
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
constexpr const char* kIsa = "avx2";
#else
constexpr int L = 1;
using VF = float;
inline VF vzero() { return 0.f; }
inline VF vset1(float a) { return a; }
inline VF vload(const float* p) { return *p; }
inline void vstore(float* p, VF a) { *p = a; }
inline VF vfma(VF a, VF b, VF c) { return a * b + c; }
inline VF vadd(VF a, VF b) { return a + b; }
inline VF vsub(VF a, VF b) { return a - b; }
inline VF vmul(VF a, VF b) { return a * b; }
inline VF vdiv(VF a, VF b) { return a / b; }
inline VF vmax(VF a, VF b) { return a > b ? a : b; }
inline VF vmin(VF a, VF b) { return a < b ? a : b; }
inline float vsum(VF a) { return a; }
inline float vhmax(VF a) { return a; }
inline VF vround(VF a) { return std::nearbyint(a); }
inline VF vpow2i(VF n) { return std::ldexp(1.f, (int)n); }
inline float h2f(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
constexpr const char* kIsa = "scalar";
#endif

// e^x in every lane, to about 2 ulp: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6
// polynomial (Cephes' expf coefficients), 2^n put into the exponent bits. Inputs are
// clamped to [-86, 88.7]: below, the result is e^-86 (4e-38), not 0; above, about 3.4e38,
// not inf. Softmax and sigmoid, the callers, come out the same either way.
inline VF vexp(VF x) {
  x = vmin(vmax(x, vset1(-86.f)), vset1(88.72283f));
  const VF n = vround(vmul(x, vset1(1.44269504088896341f)));
  VF r = vfma(n, vset1(-0.693359375f), x);  // ln2 in two parts: r = x - n ln2, exactly
  r = vfma(n, vset1(2.12194440e-4f), r);
  VF p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(vmul(p, r), r, vadd(r, vset1(1.f)));  // 1 + r + r^2 p(r)
  // n is at most 128 here (x <= 88.7): split 2^n as 2^(n-1) * 2 so the exponent stays normal.
  return vmul(vmul(p, vpow2i(vsub(n, vset1(1.f)))), vset1(2.f));
}

}  // namespace muse_vec
