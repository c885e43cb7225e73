// Weight-only quantized linear layers for CPU: int8 (symmetric) and int4 (asymmetric).
//
// Built at first use by muse/quant.py through torch.utils.cpp_extension.load, once per
// instruction set the CPU runs and Muse is asked to use (MUSE_CPU): the same source is
// compiled with -mavx512f... (16 lanes), -mavx2 -mfma -mf16c (8 lanes) or no ISA flag
// (1 lane), with or without VNNI; each build is its own module, picked at run time.
//
// Layouts (see QuantLinear's docstring, which is the reference):
//   bits=8: q int8 (N, K), row-major; w[n,k] = scale[n, k/G] * q[n,k]
//   bits=4: q uint8 (N, K/2); each run of 32 codes along k is 16 bytes, byte j holding
//           code j in its low nibble and code j+16 in its high nibble;
//           w[n,k] = scale[n, k/G] * code + min[n, k/G]
//   scale, min: fp16 (N, K/G).  The kernels need G % 32 == 0; quant.py checks.
//
// Fused path (decode, and prefill unless told otherwise): threads take tasks of W rows,
// stream them from DRAM once, turn codes into the exact fp32 weights in registers (int8:
// cvt * scale; int4: AVX-512 looks the 16 values of a group up with one vpermps, AVX2
// does cvt + fma) and FMA them with 4 rows of x at a time (AVX2: 8), all rows of x passing
// over a task's rows of W while they sit in L1/L2: a register-blocked GEMM for any M.
// Int8-activation path (act_bits=8, precision "w4a8"): each row of x is quantized once
// per call into blocks of 32 int8 codes a with an fp32 scale d (x ~ d * a, d = absmax/127)
// and W's codes meet them in integer dot products (maddubs + madd, or one VNNI dpbusd),
// as llama.cpp's Q4_1 x Q8_1 does: per block of 32,
//   int4: sum_k (s c_k + m) d a_k = s d (sum_k c_k a_k) + m d (sum_k a_k)
//   int8: sum_k (s c_k) d a_k     = s d (sum_k c_k a_k)
// The weights stay exact; only x is rounded (about 0.4 % per element).
// Tile path (M >= prefill_min_m): dequantize tile_n rows of W into an fp32 scratch
// (parallel over rows) and hand each tile to at::mm (MKL / oneDNN). quant.py picks it
// only where it measured faster (long rows, many rows of x).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <vector>

#include "vec.h"

namespace {

using namespace muse_vec;

// What the quantized kernels add to vec.h: int8 and int4 codes into VF lanes.
#if defined(__AVX512F__)
inline VF vload_i8(const int8_t* p) {  // 16 int8 -> 16 floats
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
// int4 group dequantizer: the 16 possible values scale * c + min live in one register, and
// vpermps picks them by the low 4 bits of each lane, so no masking or int->float needed.
struct Deq4 {
  VF table;
  Deq4(float s, float m)
      : table(_mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_ps(s), _mm512_set1_ps(m))) {}
  void operator()(const uint8_t* p, VF* w) const {  // 16 bytes -> codes 0..15, 16..31
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    w[0] = _mm512_permutexvar_ps(b, table);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
  }
};
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline VF vload_i8(const int8_t* p) {  // 8 int8 -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
inline void vunpack4(const uint8_t* p, VF* w) {  // 16 bytes -> codes 0..7, 8..15, 16..23, 24..31
  const __m128i b = _mm_loadu_si128((const __m128i*)p);
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, m);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo)));
  w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(hi, hi)));
}
#define MUSE_GENERIC_DEQ4
#else
inline VF vload_i8(const int8_t* p) { return (float)*p; }
inline void vunpack4(const uint8_t* p, VF* w) {
  for (int j = 0; j < 16; ++j) {
    w[j] = (float)(p[j] & 15);
    w[j + 16] = (float)(p[j] >> 4);
  }
}
#define MUSE_GENERIC_DEQ4
#endif

constexpr int kChunk = 32;          // codes per inner step (and per int4 packing run)
constexpr int kVecs = kChunk / L;   // vectors per chunk

#ifdef MUSE_GENERIC_DEQ4
struct Deq4 {  // int4 group dequantizer: codes -> float -> scale * c + min
  VF s, m;
  Deq4(float s_, float m_) : s(vset1(s_)), m(vset1(m_)) {}
  void operator()(const uint8_t* p, VF* w) const {
    vunpack4(p, w);
    for (int j = 0; j < kVecs; ++j) w[j] = vfma(w[j], s, m);
  }
};
#endif

struct Problem {
  const float* x;      // (M, K) contiguous
  const void* q;       // packed codes, see layout above
  const uint16_t* s;   // (N, ng) fp16 bits
  const uint16_t* mn;  // (N, ng) fp16 bits, int4 only
  const float* bias;   // (N,) or nullptr
  float* y;            // (M, N) contiguous
  int64_t M, N, K, G, ng;
  // int8-activation path only (quantize_rows fills them): x ~ xd[m, b] * xq[m, k], b = k / 32
  const int8_t* xq;    // (M, K)
  const float* xd;     // (M, K / 32)
  const float* xgs;    // (M, ng): sum over group g's blocks of xd * (sum of their codes), int4 only
};

// Group g of row n dequantized chunk by chunk: 32 fp32 weights per call, in w[kVecs].
template <bool Q4>
struct RowGroup {
  const Problem& p;
  const int64_t n;
  const float s, m;
  const Deq4 d4;
  const VF vs;
  RowGroup(const Problem& p_, int64_t n_, int64_t g)
      : p(p_), n(n_), s(h2f(p_.s[n_ * p_.ng + g])), m(Q4 ? h2f(p_.mn[n_ * p_.ng + g]) : 0.f),
        d4(s, m), vs(vset1(s)) {}
  void chunk(int64_t k, VF* w) const {  // weights k .. k+31 of row n
    if constexpr (Q4) {
      d4((const uint8_t*)p.q + n * (p.K / 2) + k / 2, w);
    } else {
      const int8_t* c = (const int8_t*)p.q + n * p.K + k;
      for (int j = 0; j < kVecs; ++j) w[j] = vmul(vload_i8(c + j * L), vs);
    }
  }
};

// y[m0:m0+MT, n0:n1] for MT rows of x. Weights are dequantized exactly as
// QuantLinear.dequantize does (scale * c + min is exact or singly rounded either way) and
// FMA'd with x; R rows of W go together so that there are enough independent FMA chains.
template <int MT, bool Q4>
void matvec_rows(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int R = (kVecs < 4 && MT <= 2) ? 2 : 1;
  const float* x = p.x + m0 * p.K;
  const int64_t K = p.K, G = p.G, ng = p.ng;
  auto block = [&](int64_t n, auto rows) {
    constexpr int RR = decltype(rows)::value;
    // AVX2 has 16 vector registers: with 3-4 rows of x (the server's batches), kVecs = 4
    // accumulators per row would spill to the stack, so pairs of vectors share one (still
    // 6-8 independent FMA chains).
    // With 8 rows (a batch of 8 and more), one accumulator per row: 8 chains, 12 registers.
    constexpr int KA = (kVecs == 4 && MT > 4) ? 1 : (kVecs == 4 && MT > 2) ? 2 : kVecs;
    VF acc[MT][RR][KA];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < RR; ++r)
        for (int j = 0; j < KA; ++j) acc[m][r][j] = vzero();
    for (int64_t g = 0; g < ng; ++g) {
      const RowGroup<Q4> grp0(p, n, g);
      const RowGroup<Q4> grp1(p, RR > 1 ? n + 1 : n, g);
      for (int64_t k = g * G; k < (g + 1) * G; k += kChunk) {
        VF w[RR][kVecs];
        grp0.chunk(k, w[0]);
        if constexpr (RR > 1) grp1.chunk(k, w[RR - 1]);
        for (int m = 0; m < MT; ++m)
          for (int j = 0; j < kVecs; ++j) {
            const VF xv = vload(x + m * K + k + j * L);
            for (int r = 0; r < RR; ++r) acc[m][r][j % KA] = vfma(w[r][j], xv, acc[m][r][j % KA]);
          }
      }
    }
    for (int r = 0; r < RR; ++r) {
      const float b = p.bias ? p.bias[n + r] : 0.f;
      for (int m = 0; m < MT; ++m) {
        VF a = acc[m][r][0];
        for (int j = 1; j < KA; ++j) a = vadd(a, acc[m][r][j]);
        p.y[(m0 + m) * p.N + n + r] = vsum(a) + b;
      }
    }
  };
  int64_t n = n0;
  for (; n + R <= n1; n += R) block(n, std::integral_constant<int, R>{});
  for (; n < n1; ++n) block(n, std::integral_constant<int, 1>{});
}

// Rows of W are handed out in tasks from an atomic counter to torch's intra-op threads
// (at::parallel_for, so torch.set_num_threads holds): a thread that starts late, or
// shares its core with another process, just takes fewer tasks. rows_fn(n0, n1) computes
// y[:, n0:n1]; it passes all rows of x over the task's rows of W, read from DRAM once.
template <typename RowsFn>
void for_row_tasks(const Problem& p, RowsFn rows_fn) {
  constexpr int64_t kMinWeightsPerThread = 1 << 15;
  const int64_t threads = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), p.N * p.K / kMinWeightsPerThread));
  // tasks of at most ~64 KB of codes when M > 1, so that they stay in L2 across x rows
  int64_t rows = std::max<int64_t>(16, p.N / (16 * threads));
  if (p.M > 1) rows = std::min<int64_t>(rows, std::max<int64_t>(2, 65536 / p.K));
  rows += rows & 1;  // even, for the 2-row blocks of the row kernels
  const int64_t tasks = (p.N + rows - 1) / rows;
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;)
      rows_fn(t * rows, std::min(p.N, t * rows + rows));
  };
  if (threads == 1) work(0, 1);
  else at::parallel_for(0, threads, 1, work);
}

// x rows kWideRows at a time while that many are left (AVX2: 8, else 4), then MT = min(4,
// rows left): Kernel<MT>::run(p, m0, n0, n1). Each pass dequantizes the task's rows of W again, and on AVX2 that
// costs about 3/4 of the FMAs of 4 rows: one pass over 8 rows made the server's batch of 8
// 1.01-1.17x faster per linear, median 1.09x (int8 activations 1.06-1.25x); on AVX-512 it
// measured 0.92-1.13x. On AVX2 a rest of 5-7 rows (a prompt lookup draft being checked) goes in
// one pass too, not 4 + 1-3: a whole SmolLM2 step of 6-7 tokens (AVX2, 150 cached) went from
// 1.72-2.12x one token's time to 1.66-1.98x (w4a8 2.06-2.46x to 1.83-2.16x); 5 rows, no clear change.
constexpr int kWideRows = L == 8 ? 8 : 4;
template <template <int> class Kernel>
void over_x_rows(const Problem& p, int64_t n0, int64_t n1) {
  int64_t m0 = 0;
  for (; p.M - m0 >= kWideRows; m0 += kWideRows) Kernel<kWideRows>::run(p, m0, n0, n1);
  if constexpr (kWideRows == 8) {
    switch (p.M - m0) {
      case 5: Kernel<5>::run(p, m0, n0, n1); return;
      case 6: Kernel<6>::run(p, m0, n0, n1); return;
      case 7: Kernel<7>::run(p, m0, n0, n1); return;
      default: break;
    }
  }
  for (; m0 < p.M; m0 += 4) {
    switch (std::min<int64_t>(4, p.M - m0)) {
      case 1: Kernel<1>::run(p, m0, n0, n1); break;
      case 2: Kernel<2>::run(p, m0, n0, n1); break;
      case 3: Kernel<3>::run(p, m0, n0, n1); break;
      default: Kernel<4>::run(p, m0, n0, n1); break;
    }
  }
}

template <bool Q4>
struct Fp32Rows {
  template <int MT>
  struct K {
    static void run(const Problem& p, int64_t m0, int64_t n0, int64_t n1) { matvec_rows<MT, Q4>(p, m0, n0, n1); }
  };
};

template <bool Q4>
void matvec(const Problem& p) {
  for_row_tasks(p, [&](int64_t n0, int64_t n1) { over_x_rows<Fp32Rows<Q4>::template K>(p, n0, n1); });
}

// ---------------------------------------------------------------------------------------
// Int8-activation path
// ---------------------------------------------------------------------------------------

// x (M, K) -> xq, xd, and for int4 xgs; rounding half to even, as torch.round does, of
// x * (1 / d) with d = absmax / 127, all in fp32 (so that the Python reference matches).
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t G, bool q4, int8_t* xq, float* xd, float* xgs) {
  const int64_t nb = K / kChunk, bpg = G / kChunk;
  at::parallel_for(0, M, 1, [&](int64_t m_begin, int64_t m_end) {
    for (int64_t m = m_begin; m < m_end; ++m) {
      float group_sum = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const float* v = x + m * K + b * kChunk;
        float amax = 0.f;
        for (int j = 0; j < kChunk; ++j) amax = std::max(amax, std::fabs(v[j]));
        const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        int32_t sum = 0;
        for (int j = 0; j < kChunk; ++j) {
          const int32_t c = (int32_t)std::nearbyint(v[j] * inv);
          xq[m * K + b * kChunk + j] = (int8_t)c;
          sum += c;
        }
        xd[m * nb + b] = d;
        if (q4) {
          group_sum += d * (float)sum;
          if ((b + 1) % bpg == 0) {
            xgs[m * (K / G) + b / bpg] = group_sum;
            group_sum = 0.f;
          }
        }
      }
    }
  });
}

#ifdef MUSE_SIMD_256
// 8 int32 lanes, each the sum of 4 adjacent products u[i] * s[i] (u unsigned, s signed)
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(MUSE_VNNI) && defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#elif defined(MUSE_VNNI)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  // |u * s| <= 255 * 127 per product: a pair fits int16 for int4 (15 * 127 * 2) and for
  // int8 as |w| <= 128 (128 * 127 * 2 = 32512)
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// The 32 weight codes of block k.. of row n as unsigned bytes u, and for int8 their signs
// (maddubs multiplies unsigned by signed: int8 uses |w| and moves w's sign onto x).
template <bool Q4>
inline void load_block(const Problem& p, int64_t n, int64_t k, __m256i& u, __m256i& w) {
  if constexpr (Q4) {
    const __m128i b = _mm_loadu_si128((const __m128i*)((const uint8_t*)p.q + n * (p.K / 2) + k / 2));
    u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
  } else {
    w = _mm256_loadu_si256((const __m256i*)((const int8_t*)p.q + n * p.K + k));
    u = _mm256_sign_epi8(w, w);
  }
}
#endif

// The int4 mins' share of one output: sum_g min[g] * xgs[g], 8 fp16 mins converted at a time
// (per scalar it cost as much as a third of a decode matvec at K = 576).
inline float mins_share(const uint16_t* mn, const float* xgs, int64_t ng) {
  float y = 0.f;
  int64_t g = 0;
#ifdef MUSE_SIMD_256
  __m256 acc = _mm256_setzero_ps();
  for (; g + 8 <= ng; g += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mn + g))), _mm256_loadu_ps(xgs + g), acc);
  y = hsum256(acc);
#endif
  for (; g < ng; ++g) y += h2f(mn[g]) * xgs[g];
  return y;
}

// The codes of the rows `ahead` of the ones being read, within the task: the integer dot
// products use so few instructions per byte that, streaming int8 weights at M=1, they waited
// on DRAM: the 28 MB lm_head of SmolLM2 at 17 GB/s where the fp32-activation path reached 30.
// Measured old vs new side by side (M=1, cold weights): int8 1.7-2.4x on AVX2 and 1.3-2.0x on
// AVX-512 for every shape but 576x576 (0.95-1.08x); int4 1.08-1.36x on AVX2 (Qwen's MLP
// most), but 0.73-1.04x on AVX-512, which keeps int4 unprefetched.
constexpr int64_t kPrefetchBytes = 4096;
template <bool Q4>
constexpr bool kPrefetch = !Q4 || L == 8;
inline void prefetch_rows(const Problem& p, int64_t n, int64_t rows, int64_t row_bytes) {
  const char* c = (const char*)p.q + n * row_bytes;  // rows n.. are contiguous
  for (int64_t i = 0; i < rows * row_bytes; i += 64) __builtin_prefetch(c + i);
}

// y[m0:m0+MT, n0:n1] from xq: R rows of W at a time, so that a lone x row (decode) still
// has R independent accumulation chains.
template <int MT, bool Q4>
void matvec_rows_a8(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int R = MT <= 2 ? 2 : 1;
  const int64_t K = p.K, nb = K / kChunk, bpg = p.G / kChunk, ng = p.ng;
  const int64_t row_bytes = Q4 ? K / 2 : K, ahead = std::max<int64_t>(1, kPrefetchBytes / row_bytes);
  auto block = [&](int64_t n, auto rows) {
    constexpr int RR = decltype(rows)::value;
    if (kPrefetch<Q4> && n + ahead + RR <= n1) prefetch_rows(p, n + ahead, RR, row_bytes);
#ifdef MUSE_SIMD_256
    __m256 acc[RR][MT];
    for (int r = 0; r < RR; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
#else
    float acc[RR][MT] = {};
#endif
    for (int64_t g = 0; g < ng; ++g) {
      float s[RR];
      for (int r = 0; r < RR; ++r) s[r] = h2f(p.s[(n + r) * ng + g]);
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
        const int64_t k = b * kChunk;
#ifdef MUSE_SIMD_256
        __m256i u[RR], w[RR];
        for (int r = 0; r < RR; ++r) load_block<Q4>(p, n + r, k, u[r], w[r]);
        for (int m = 0; m < MT; ++m) {
          const __m256i a = _mm256_loadu_si256((const __m256i*)(p.xq + (m0 + m) * K + k));
          const float d = p.xd[(m0 + m) * nb + b];
          for (int r = 0; r < RR; ++r) {
            const __m256i dot = dot_u8s8(u[r], Q4 ? a : _mm256_sign_epi8(a, w[r]));
            acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s[r] * d), acc[r][m]);
          }
        }
#else
        for (int r = 0; r < RR; ++r)
          for (int m = 0; m < MT; ++m) {
            const int8_t* a = p.xq + (m0 + m) * K + k;
            int32_t dot = 0;
            if constexpr (Q4) {
              const uint8_t* c = (const uint8_t*)p.q + (n + r) * (K / 2) + k / 2;
              for (int j = 0; j < 16; ++j) dot += (c[j] & 15) * a[j] + (c[j] >> 4) * a[j + 16];
            } else {
              const int8_t* c = (const int8_t*)p.q + (n + r) * K + k;
              for (int j = 0; j < kChunk; ++j) dot += c[j] * a[j];
            }
            acc[r][m] += (float)dot * (s[r] * p.xd[(m0 + m) * nb + b]);
          }
#endif
      }
    }
    for (int r = 0; r < RR; ++r) {
      const float bias = p.bias ? p.bias[n + r] : 0.f;
      for (int m = 0; m < MT; ++m) {
#ifdef MUSE_SIMD_256
        float y = hsum256(acc[r][m]);
#else
        float y = acc[r][m];
#endif
        if constexpr (Q4) y += mins_share(p.mn + (n + r) * ng, p.xgs + (m0 + m) * ng, ng);
        p.y[(m0 + m) * p.N + n + r] = y + bias;
      }
    }
  };
  int64_t n = n0;
  for (; n + R <= n1; n += R) block(n, std::integral_constant<int, R>{});
  for (; n < n1; ++n) block(n, std::integral_constant<int, 1>{});
}

template <bool Q4>
struct A8Rows {
  template <int MT>
  struct K {
    static void run(const Problem& p, int64_t m0, int64_t n0, int64_t n1) { matvec_rows_a8<MT, Q4>(p, m0, n0, n1); }
  };
};

template <bool Q4>
void matvec_a8(Problem& p, const at::Tensor& x) {
  at::Tensor xq = at::empty({p.M, p.K}, x.options().dtype(at::kChar));
  at::Tensor xd = at::empty({p.M, p.K / kChunk}, x.options());
  at::Tensor xgs = at::empty({p.M, p.ng}, x.options());
  p.xq = xq.data_ptr<int8_t>();
  p.xd = xd.data_ptr<float>();
  p.xgs = xgs.data_ptr<float>();
  quantize_rows(p.x, p.M, p.K, p.G, Q4, xq.data_ptr<int8_t>(), xd.data_ptr<float>(), xgs.data_ptr<float>());
  for_row_tasks(p, [&](int64_t n0, int64_t n1) { over_x_rows<A8Rows<Q4>::template K>(p, n0, n1); });
}

// Row n of W in fp32 into out (K floats); same values as QuantLinear.dequantize.
template <bool Q4>
void dequant_row(const Problem& p, int64_t n, float* out) {
  for (int64_t g = 0; g < p.ng; ++g) {
    const RowGroup<Q4> grp(p, n, g);
    for (int64_t k = g * p.G; k < (g + 1) * p.G; k += kChunk) {
      VF w[kVecs];
      grp.chunk(k, w);
      for (int j = 0; j < kVecs; ++j) vstore(out + k + j * L, w[j]);
    }
  }
}

template <bool Q4>
void dequant_rows(const Problem& p, int64_t n0, int64_t n1, float* out) {
  at::parallel_for(n0, n1, 8, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) dequant_row<Q4>(p, n, out + (n - n0) * p.K);
  });
}

Problem make_problem(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& mins, const c10::optional<at::Tensor>& bias,
                     int64_t bits, int64_t group_size, at::Tensor& y) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 (M, K) tensor");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = group_size;
  TORCH_CHECK(G > 0 && G % kChunk == 0 && K % G == 0, "group_size must be a multiple of 32 dividing K");
  TORCH_CHECK(q.is_contiguous() && q.dim() == 2, "qweight must be a contiguous 2-D tensor");
  if (bits == 8) {
    TORCH_CHECK(q.scalar_type() == at::kChar && q.size(1) == K, "int8 qweight must be int8 (N, K)");
  } else {
    TORCH_CHECK(q.scalar_type() == at::kByte && q.size(1) == K / 2, "int4 qweight must be uint8 (N, K/2)");
    TORCH_CHECK(mins.has_value(), "int4 needs mins");
  }
  const int64_t ng = K / G;
  auto check_half = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.size(0) == N && t.size(1) == ng,
                name, " must be a contiguous float16 (N, K/G) tensor");
  };
  check_half(scales, "scales");
  Problem p{};
  p.x = x.data_ptr<float>();
  p.q = q.data_ptr();
  p.s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  if (bits == 4) {
    check_half(*mins, "mins");
    p.mn = reinterpret_cast<const uint16_t*>(mins->data_ptr<at::Half>());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias must be a contiguous float32 (N,) tensor");
    p.bias = bias->data_ptr<float>();
  }
  y = at::empty({M, N}, x.options());
  p.y = y.data_ptr<float>();
  p.M = M; p.N = N; p.K = K; p.G = G; p.ng = ng;
  return p;
}

// y = x @ W.T + bias. M < prefill_min_m: the fused kernel, on int8 activations if
// act_bits == 8; else W is dequantized tile_n rows at a time (tile_n <= 0: all at once)
// and multiplied with at::mm, exactly.
at::Tensor linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& mins, const c10::optional<at::Tensor>& bias,
                  int64_t bits, int64_t group_size, int64_t prefill_min_m, int64_t tile_n, int64_t act_bits) {
  at::Tensor y;
  const bool q4 = bits == 4;
  Problem p = make_problem(x, q, scales, mins, bias, bits, group_size, y);
  TORCH_CHECK(act_bits == 32 || act_bits == 8, "act_bits must be 8 or 32");
  if (p.M < prefill_min_m && act_bits == 8) {
    if (q4) matvec_a8<true>(p, x); else matvec_a8<false>(p, x);
    return y;
  }
  if (p.M < prefill_min_m) {
    if (q4) matvec<true>(p); else matvec<false>(p);
    return y;
  }
  const int64_t tn = tile_n <= 0 ? p.N : std::min(tile_n, p.N);
  at::Tensor w = at::empty({tn, p.K}, x.options());
  for (int64_t n0 = 0; n0 < p.N; n0 += tn) {
    const int64_t nt = std::min(tn, p.N - n0);
    if (q4) dequant_rows<true>(p, n0, n0 + nt, w.data_ptr<float>());
    else dequant_rows<false>(p, n0, n0 + nt, w.data_ptr<float>());
    at::Tensor yt = y.narrow(1, n0, nt);  // (M, nt), row stride N: BLAS writes it in place
    at::mm_out(yt, x, w.narrow(0, 0, nt).t());
  }
  if (bias.has_value()) y.add_(*bias);
  return y;
}

// Rows [n0, n1) of W in fp32 (used by tests and for dequantize()).
at::Tensor dequantize(const at::Tensor& q, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                      int64_t bits, int64_t group_size, int64_t K) {
  at::Tensor y;
  at::Tensor x = at::empty({0, K}, scales.options().dtype(at::kFloat));
  Problem p = make_problem(x, q, scales, mins, c10::nullopt, bits, group_size, y);
  at::Tensor out = at::empty({p.N, K}, x.options());
  if (bits == 4) dequant_rows<true>(p, 0, p.N, out.data_ptr<float>());
  else dequant_rows<false>(p, 0, p.N, out.data_ptr<float>());
  return out;
}

// ---------------------------------------------------------------------------------------
// Fused decode layer: a few tokens (a decode step, a draft being checked, a batch's next
// tokens) through a pre-norm Llama/Qwen2 block in one call, where model.py's Block makes
// some 25 dispatches (norms, RoPE, cache writes, attention, SiLU * up, residuals) around
// its four linears.
// muse/model.py stays the reference; muse/fused.py decides when this applies and is tested
// equal to it.
// ---------------------------------------------------------------------------------------

// (qweight, scales, mins, bias, bits, group_size, act_bits): a QuantLinear's buffers
using Lin = std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, int64_t,
                       int64_t, int64_t>;

inline float dot(const float* a, const float* b, int64_t n) {
  VF acc = vzero();
  int64_t i = 0;
  for (; i + L <= n; i += L) acc = vfma(vload(a + i), vload(b + i), acc);
  float s = vsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {  // y += w * x
  const VF vw = vset1(w);
  int64_t i = 0;
  for (; i + L <= n; i += L) vstore(y + i, vfma(vw, vload(x + i), vload(y + i)));
  for (; i < n; ++i) y[i] += w * x[i];
}

at::Tensor apply_linear(const at::Tensor& x, const Lin& l) {  // x (T, K) -> (T, N), T < 32: the fused kernel
  return linear(x, std::get<0>(l), std::get<1>(l), std::get<2>(l), std::get<3>(l), std::get<4>(l), std::get<5>(l),
                int64_t(1) << 62, 0, std::get<6>(l));
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {  // (T, D) row by row, as F.rms_norm
  const int64_t T = x.size(0), D = x.size(1);
  const float* g = w.data_ptr<float>();
  at::Tensor y = at::empty_like(x);
  for (int64_t t = 0; t < T; ++t) {
    const float* a = x.data_ptr<float>() + t * D;
    float* o = y.data_ptr<float>() + t * D;
    const float r = 1.f / std::sqrt(dot(a, a, D) / (float)D + (float)eps);
    for (int64_t i = 0; i < D; ++i) o[i] = a[i] * r * g[i];
  }
  return y;
}

// "rotate half" RoPE of `heads` heads of hd at one position; cos/sin (hd,), halves duplicated
void rope(float* x, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t h = hd / 2;
  for (int64_t n = 0; n < heads; ++n, x += hd)
    for (int64_t i = 0; i < h; ++i) {
      const float a = x[i], b = x[i + h];
      x[i] = a * cos[i] - b * sin[i];
      x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

// Query row j of x, for each head: at position where[j] of cache row row[j], it sees that row's
// keys 0..where[j]; q (R, nh*hd) with row stride q_stride; kc/vc (rows, nkv, len, hd), already
// holding these queries' own keys.
at::Tensor attend(const float* q, int64_t q_stride, const int64_t* row, const int64_t* where, int64_t R,
                  const at::Tensor& kc, const at::Tensor& vc, int64_t nh, int64_t nkv, int64_t hd) {
  at::Tensor out = at::empty({R, nh * hd}, kc.options());
  float* o = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt((float)hd);
  const int64_t group = nh / nkv, r_stride = kc.stride(0), kv_stride = kc.stride(1), t_stride = kc.stride(2);
  const float* K = kc.data_ptr<float>();
  const float* V = vc.data_ptr<float>();
  const int64_t Lk = *std::max_element(where, where + R) + 1, pairs = R * nh;
  // (query, head) pairs in parallel only when there is enough to share: a region costs microseconds
  const int64_t grain = Lk * hd * pairs < (1 << 16) ? pairs : 1;
  at::Tensor S = at::empty({pairs, Lk}, kc.options());  // scores, -inf past each query's last key
  float* sp = S.data_ptr<float>();
  at::parallel_for(0, pairs, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t r = j / nh, h = j % nh;
      const float* qh = q + r * q_stride + h * hd;
      const float* kh = K + row[r] * r_stride + (h / group) * kv_stride;
      for (int64_t t = 0; t <= where[r]; ++t) sp[j * Lk + t] = dot(qh, kh + t * t_stride, hd) * scale;
      std::fill(sp + j * Lk + where[r] + 1, sp + (j + 1) * Lk, -INFINITY);
    }
  });
  const at::Tensor P = at::softmax(S, 1);  // one vectorized pass for every head
  const float* pp = P.data_ptr<float>();
  at::parallel_for(0, pairs, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t r = j / nh, h = j % nh;
      const float* vh = V + row[r] * r_stride + (h / group) * kv_stride;
      float* oh = o + r * nh * hd + h * hd;
      std::fill_n(oh, hd, 0.f);
      for (int64_t t = 0; t <= where[r]; ++t) axpy(pp[j * Lk + t], vh + t * t_stride, oh, hd);
    }
  });
  return out;
}

// x (R, D) after the block. Row j is a token at position where[j] of cache row row[j]: one
// sequence's new token or draft (rows all 0, positions pos, pos+1, ...) or a batch's next
// tokens (row b at its own length). Their keys and values are written into the caches first.
// cos/sin (R, hd): the RoPE rows of those positions.
at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& norm1, const at::Tensor& norm2, double eps,
                        const Lin& qkv, const Lin& proj, const Lin& gate_up, const Lin& down,
                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kc, const at::Tensor& vc,
                        const at::Tensor& rows, const at::Tensor& positions, int64_t nh, int64_t nkv) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "x must be a contiguous float32 (R, D) tensor");
  const int64_t R = x.size(0);
  TORCH_CHECK(rows.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && rows.is_contiguous() &&
                  positions.is_contiguous() && rows.numel() == R && positions.numel() == R,
              "rows and positions must be contiguous int64 tensors of one entry per row of x");
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* where = positions.data_ptr<int64_t>();
  TORCH_CHECK(kc.scalar_type() == at::kFloat && kc.dim() == 4 && kc.size(1) == nkv && kc.stride(3) == 1 &&
                  vc.strides() == kc.strides() && vc.sizes() == kc.sizes() && nkv > 0 && nh % nkv == 0,
              "the KV cache must be float32 (rows, nkv, len, hd)");
  for (int64_t j = 0; j < R; ++j)
    TORCH_CHECK(0 <= row[j] && row[j] < kc.size(0) && 0 <= where[j] && where[j] < kc.size(2),
                "a token's cache row or position lies outside the KV cache");
  const int64_t hd = kc.size(3), width = (nh + 2 * nkv) * hd;
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == R && cos.size(1) == hd,
              "cos/sin must be contiguous (R, head_dim)");
  at::Tensor q = apply_linear(rms_norm(x, norm1, eps), qkv);  // (R, (nh + 2 nkv) hd): [q heads, k heads, v heads]
  TORCH_CHECK(q.size(1) == width, "qkv's output does not match the heads");
  float* K = kc.data_ptr<float>();
  float* V = vc.data_ptr<float>();
  for (int64_t j = 0; j < R; ++j) {
    float* qj = q.data_ptr<float>() + j * width;
    rope(qj, nh + nkv, hd, cos.data_ptr<float>() + j * hd, sin.data_ptr<float>() + j * hd);  // q, k heads
    const int64_t base = row[j] * kc.stride(0) + where[j] * kc.stride(2);
    for (int64_t h = 0; h < nkv; ++h) {
      std::copy_n(qj + (nh + h) * hd, hd, K + base + h * kc.stride(1));
      std::copy_n(qj + (nh + nkv + h) * hd, hd, V + base + h * vc.stride(1));
    }
  }
  at::Tensor h = x + apply_linear(attend(q.data_ptr<float>(), width, row, where, R, kc, vc, nh, nkv, hd), proj);
  at::Tensor gu = apply_linear(rms_norm(h, norm2, eps), gate_up);  // (R, 2F): [gate, up]
  const int64_t F = gu.size(1) / 2;
  const at::Tensor a = at::silu(gu.narrow(1, 0, F)).mul_(gu.narrow(1, F, F)).contiguous();  // vectorized exp
  return h + apply_linear(a, down);
}

// decode_layer over every block of a model, each block's arguments converted from Python
// once: muse/fused.py keeps one per KV cache (a generation, or the server's batch). Per
// token, reading the blocks' buffers from the modules and converting them cost SmolLM2's
// 30 layers about 0.6 ms on AVX2, some 7 % of a w4a8 decode step.
class DecodeStack {
 public:
  using Args = std::tuple<at::Tensor, at::Tensor, double, Lin, Lin, Lin, Lin>;  // norm1, norm2, eps, 4 linears

  explicit DecodeStack(std::vector<Args> blocks) : blocks_(std::move(blocks)) {}

  // x (R, D) through every block; k[i], v[i]: block i's cache, as decode_layer takes them
  at::Tensor run(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const std::vector<at::Tensor>& k,
                 const std::vector<at::Tensor>& v, const at::Tensor& rows, const at::Tensor& positions, int64_t nh,
                 int64_t nkv) const {
    TORCH_CHECK(k.size() == blocks_.size() && v.size() == blocks_.size(), "one cache layer per block");
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const Args& b = blocks_[i];
      x = decode_layer(x, std::get<0>(b), std::get<1>(b), std::get<2>(b), std::get<3>(b), std::get<4>(b),
                       std::get<5>(b), std::get<6>(b), cos, sin, k[i], v[i], rows, positions, nh, nkv);
    }
    return x;
  }

  size_t size() const { return blocks_.size(); }

 private:
  std::vector<Args> blocks_;
};

int64_t vector_lanes() { return L; }

#ifdef MUSE_VNNI
std::string isa() { return std::string(kIsa) + "-vnni"; }
#else
std::string isa() { return kIsa; }
#endif

}  // namespace

void register_train_kernels(pybind11::module_& m);  // muse/kernels/train_cpu.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "quantized linear: y = x @ W.T + bias",
        py::call_guard<py::gil_scoped_release>());
  m.def("dequantize", &dequantize, "dequantize all rows of W to float32",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_layer", &decode_layer, "a few tokens through a pre-norm SwiGLU block (see muse/fused.py)",
        py::call_guard<py::gil_scoped_release>());
  py::class_<DecodeStack>(m, "DecodeStack", "decode_layer over every block, arguments converted once")
      .def(py::init<std::vector<DecodeStack::Args>>())
      .def("run", &DecodeStack::run, "x (R, D) through every block", py::call_guard<py::gil_scoped_release>())
      .def("__len__", &DecodeStack::size);
  register_train_kernels(m);
  m.def("vector_lanes", &vector_lanes, "float lanes of the compiled SIMD path (16, 8 or 1)");
  m.def("isa", &isa, "the instruction set this module was built for (avx512-vnni, avx512, avx2-vnni, avx2, scalar)");
}
