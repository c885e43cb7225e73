// Kernels for the fp32 forward and backward passes of small models on the CPU, where
// PyTorch's general kernels spend most of a step outside the matrix products: GELU (tanh
// form) and causal self-attention over short sequences. muse/ops.py wraps them as autograd
// functions; model.py's PyTorch calls are the reference they are tested equal to.
//
// Layouts: attention takes qkv (B, T, H + 2 Hk, D) as model.py's projection lays it out
// (query heads, key heads, value heads; any strides, the last dimension contiguous; H a
// multiple of Hk for grouped-query attention), writes o (B, T, H, D) contiguous, and its
// backward one gradient shaped like qkv, so the heads need no transposes or slicing. Forward keeps only lse (B, H, T), the log-sum-exp of each query's scores;
// backward recomputes the probabilities from it (as flash attention does) instead of
// storing B*H*T*T of them.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

namespace {

using namespace muse_vec;

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// sigmoid(2u), u = c (x + a x^3): gelu_tanh(x) = x * 0.5 (1 + tanh u) = x * sigmoid(2u).
// The exponent is clamped to +-80 so s stays a normal float (>= 1.8e-35): from x < -10 on,
// s would be denormal, and denormal arithmetic is some 100x slower on x86 (trained MLPs
// have such inputs; the result differs from PyTorch's by under 1e-33).
inline VF sigmoid_2u(VF x) {
  const VF u = vmul(vmul(x, vset1(kGeluC)), vfma(vmul(x, x), vset1(kGeluA), vset1(1.f)));
  const VF e = vmin(vmax(vmul(u, vset1(-2.f)), vset1(-80.f)), vset1(80.f));
  return vdiv(vset1(1.f), vadd(vset1(1.f), vexp(e)));
}

// f over [0, n) of each array in vectors of L, the tail through a zero-padded vector.
template <typename F>
void map_elements(int64_t n, F f) {
  at::parallel_for(0, (n + L - 1) / L, 2048, [&](int64_t v0, int64_t v1) {
    FlushDenormals ftz;
    for (int64_t v = v0; v < v1; ++v) f(v * L, std::min<int64_t>(L, n - v * L));
  });
}

// d/dx [x s] with s = sigmoid(2u): s + x s (1 - s) 2 du/dx, du/dx = c (1 + 3 a x^2).
inline VF gelu_derivative(VF x, VF s) {
  const VF du = vmul(vset1(2.f * kGeluC), vfma(vmul(x, x), vset1(3.f * kGeluA), vset1(1.f)));
  const VF ds = vmul(vmul(s, vsub(vset1(1.f), s)), du);
  return vfma(x, ds, s);
}

// GELU of x, and with `derivative` also gelu'(x): training keeps that instead of x, so the
// backward pass is one multiply (grad * gelu'(x)) where recomputing the sigmoid from x took
// about twice as long as the forward inside a training step (x has left the cache by then, and
// the exp and divide ran again).
std::vector<torch::Tensor> gelu_forward(torch::Tensor x, bool derivative) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "gelu: x must be contiguous float32");
  auto y = torch::empty_like(x);
  auto d = derivative ? torch::empty_like(x) : torch::Tensor();
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  float* pd = derivative ? d.data_ptr<float>() : nullptr;
  map_elements(x.numel(), [&](int64_t i, int64_t n) {
    float bx[L] = {}, by[L], bd[L];
    const bool whole = n == L;
    if (!whole) std::copy(px + i, px + i + n, bx);
    const VF a = vload(whole ? px + i : bx);
    const VF s = sigmoid_2u(a);
    vstore(whole ? py + i : by, vmul(a, s));
    if (pd) vstore(whole ? pd + i : bd, gelu_derivative(a, s));
    if (whole) return;
    std::copy(by, by + n, py + i);
    if (pd) std::copy(bd, bd + n, pd + i);
  });
  if (derivative) return {y, d};
  return {y};
}

// Row t of head h of sequence b in a (B, T, heads, D) tensor (any strides, last one 1).
struct Heads {
  float* base;
  int64_t sb, st, sh;
  float* row(int64_t b, int64_t t, int64_t h) const { return base + b * sb + t * st + h * sh; }
};

Heads heads(const torch::Tensor& t) { return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)}; }

// C[r][0:N] += alpha * sum_{k0 <= k < k1} A(r, k) * B[k][0:N] for R rows: the one small
// matrix product attention is made of. A(r, k) = A[r * ars + k * aks], so A may be read
// transposed; B and C are row-major (ldb, ldc), N a multiple of L. R rows x 2 vectors of
// accumulators stay in registers (8 at most: AVX2 has 16), so each B load feeds R FMAs.
struct MatA {
  const float* p;
  int64_t rs, ks;  // strides of a row and of a k step
};

template <int R>
void tile(MatA A, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t k0, int64_t k1, int64_t N, float alpha) {
  int64_t n = 0;
  for (; n + 2 * L <= N; n += 2 * L) {
    VF acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vzero();
    for (int64_t k = k0; k < k1; ++k) {
      const VF b0 = vload(B + k * ldb + n), b1 = vload(B + k * ldb + n + L);
      for (int r = 0; r < R; ++r) {
        const VF a = vset1(A.p[r * A.rs + k * A.ks]);
        acc[r][0] = vfma(a, b0, acc[r][0]);
        acc[r][1] = vfma(a, b1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float* c = C + r * ldc + n;
      vstore(c, vfma(acc[r][0], vset1(alpha), vload(c)));
      vstore(c + L, vfma(acc[r][1], vset1(alpha), vload(c + L)));
    }
  }
  if (n < N) {  // one vector left
    VF acc[R];
    for (int r = 0; r < R; ++r) acc[r] = vzero();
    for (int64_t k = k0; k < k1; ++k) {
      const VF b0 = vload(B + k * ldb + n);
      for (int r = 0; r < R; ++r) acc[r] = vfma(vset1(A.p[r * A.rs + k * A.ks]), b0, acc[r]);
    }
    for (int r = 0; r < R; ++r) vstore(C + r * ldc + n, vfma(acc[r], vset1(alpha), vload(C + r * ldc + n)));
  }
}

constexpr int kRows = 4;  // rows per tile

void tile_rows(int rows, MatA A, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t k0, int64_t k1,
               int64_t N, float alpha) {
  switch (rows) {
    case 4: return tile<4>(A, B, ldb, C, ldc, k0, k1, N, alpha);
    case 3: return tile<3>(A, B, ldb, C, ldc, k0, k1, N, alpha);
    case 2: return tile<2>(A, B, ldb, C, ldc, k0, k1, N, alpha);
    default: return tile<1>(A, B, ldb, C, ldc, k0, k1, N, alpha);
  }
}

// One head's rows zero-padded to Dp (row-major), and optionally transposed and padded to
// Tp (transposed[d * Tp + j] = row j's d), the two shapes `tile` reads as B.
void load_head(const Heads& src, int64_t b, int64_t h, int64_t T, int64_t D, int64_t Tp, int64_t Dp, float* padded,
               float* transposed) {
  std::fill(padded, padded + T * Dp, 0.f);
  if (transposed) std::fill(transposed, transposed + Dp * Tp, 0.f);
  for (int64_t j = 0; j < T; ++j) {
    const float* r = src.row(b, j, h);
    std::copy(r, r + D, padded + j * Dp);
    if (transposed)
      for (int64_t d = 0; d < D; ++d) transposed[d * Tp + j] = r[d];
  }
}

// The causal softmax of one row of scores s[0:n] in place, s[n:round_up(n, L)] set to 0
// (later keys' scores or padding). Forward: shift by the row's max, return the row's
// log-sum-exp. Backward (lse given): the forward's probabilities again, exp(s - lse).
float softmax_row(float* s, int64_t n, const float* lse) {
  const int64_t nv = round_up(n, L);
  float shift;
  if (lse) {
    shift = *lse;
  } else {
    std::fill(s + n, s + nv, -std::numeric_limits<float>::infinity());
    VF m = vload(s);
    for (int64_t j = L; j < nv; j += L) m = vmax(m, vload(s + j));
    shift = vhmax(m);
  }
  for (int64_t j = 0; j < nv; j += L) vstore(s + j, vexp(vsub(vload(s + j), vset1(shift))));
  std::fill(s + n, s + nv, 0.f);  // exp clamps: the masked lanes hold e^-86, not 0
  if (lse) return 0.f;
  VF sum = vzero();
  for (int64_t j = 0; j < nv; j += L) sum = vadd(sum, vload(s + j));
  const float total = vsum(sum);
  const VF inv = vset1(1.f / total);
  for (int64_t j = 0; j < nv; j += L) vstore(s + j, vmul(vload(s + j), inv));
  return shift + std::log(total);
}

struct AttnShape {
  int64_t B, T, H, Hk, D, Tp, Dp, group;
  float scale;
};

AttnShape attn_shape(const torch::Tensor& qkv, int64_t nh, int64_t nkv, double scale) {
  TORCH_CHECK(qkv.dim() == 4 && qkv.scalar_type() == torch::kFloat32 && qkv.stride(3) == 1,
              "attention: qkv must be float32 (B, T, heads, D) with the last dimension contiguous");
  TORCH_CHECK(nh > 0 && nkv > 0 && nh % nkv == 0 && qkv.size(2) == nh + 2 * nkv,
              "attention: qkv must hold n_head query heads, then n_kv_head key and value heads");
  const int64_t T = qkv.size(1), D = qkv.size(3);
  return {qkv.size(0), T, nh, nkv, D, round_up(T, L), round_up(D, L), nh / nkv, (float)scale};
}

// Softmax probabilities of query rows i0..i0+rows-1 over keys 0..i0+rows-1 into s (rows x
// Tp, zero past each row's own key). Forward writes lse[i]; backward reads it.
void probabilities(const float* q, int64_t Dp, const float* kt, int64_t D, int64_t Tp, int64_t i0, int rows,
                   float scale, float* s, float* lse, bool forward) {
  const int64_t cols = round_up(i0 + rows, L);
  std::fill(s, s + rows * Tp, 0.f);
  tile_rows(rows, {q + i0 * Dp, Dp, 1}, kt, Tp, s, Tp, 0, D, cols, scale);
  for (int r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;  // causal: query i sees keys 0..i
    if (forward) {
      lse[i] = softmax_row(s + r * Tp, i + 1, nullptr);
    } else {
      softmax_row(s + r * Tp, i + 1, lse + i);
    }
    std::fill(s + r * Tp + i + 1, s + (r + 1) * Tp, 0.f);  // the tile also scored keys past i
  }
}

// qkv (B, T, nh + 2 nkv, D): query heads, then key heads, then value heads (model.py's
// projection). Returns o (B, T, nh, D) and lse (B, nh, T).
std::vector<torch::Tensor> attention_forward(torch::Tensor qkv, int64_t nh, int64_t nkv, double scale) {
  const AttnShape a = attn_shape(qkv, nh, nkv, scale);
  auto o = torch::empty({a.B, a.T, a.H, a.D}, qkv.options());
  auto lse = torch::empty({a.B, a.H, a.T}, qkv.options());
  const Heads x = heads(qkv), out = heads(o);
  at::parallel_for(0, a.B * a.H, 1, [&](int64_t t0, int64_t t1) {
    FlushDenormals ftz;
    const int64_t T = a.T, D = a.D, Dp = a.Dp, Tp = a.Tp;
    std::vector<float> qp(T * Dp), kp(T * Dp), kt(Dp * Tp), vp(T * Dp), s(kRows * Tp), acc(kRows * Dp);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / a.H, h = task % a.H, g = h / a.group;
      load_head(x, b, h, T, D, Tp, Dp, qp.data(), nullptr);
      load_head(x, b, a.H + g, T, D, Tp, Dp, kp.data(), kt.data());
      load_head(x, b, a.H + a.Hk + g, T, D, Tp, Dp, vp.data(), nullptr);
      float* lse_row = lse.data_ptr<float>() + (b * a.H + h) * T;
      for (int64_t i0 = 0; i0 < T; i0 += kRows) {
        const int rows = (int)std::min<int64_t>(kRows, T - i0);
        probabilities(qp.data(), Dp, kt.data(), D, Tp, i0, rows, a.scale, s.data(), lse_row, true);
        std::fill(acc.begin(), acc.end(), 0.f);
        tile_rows(rows, {s.data(), Tp, 1}, vp.data(), Dp, acc.data(), Dp, 0, i0 + rows, Dp, 1.f);  // o = p v
        for (int r = 0; r < rows; ++r) std::copy(&acc[r * Dp], &acc[r * Dp] + D, out.row(b, i0 + r, h));
      }
    }
  });
  return {o, lse};
}

// The gradient of attention_forward's o, as one tensor shaped like qkv. Per head, row
// blocks give p and ds = p (dp - rowsum(dout o)) scale, dp = dout v^T, and dq = ds k; once
// p and ds are whole (T x Tp), dk += ds^T q and dv += p^T dout read them transposed.
torch::Tensor attention_backward(torch::Tensor dout, torch::Tensor qkv, int64_t nh, int64_t nkv, torch::Tensor o,
                                 torch::Tensor lse, double scale) {
  const AttnShape a = attn_shape(qkv, nh, nkv, scale);
  TORCH_CHECK(dout.is_contiguous() && o.is_contiguous() && lse.is_contiguous() &&
                  dout.scalar_type() == torch::kFloat32 && dout.sizes() == o.sizes(),
              "attention_backward: dout, o and lse must be attention_forward's, contiguous float32");
  auto grad = torch::empty({a.B, a.T, a.H + 2 * a.Hk, a.D}, qkv.options());
  const Heads x = heads(qkv), gx = heads(grad), go = heads(dout), out = heads(o);
  // One task per (b, kv head): the query heads that share it add into its dk, dv alone.
  at::parallel_for(0, a.B * a.Hk, 1, [&](int64_t t0, int64_t t1) {
    FlushDenormals ftz;
    const int64_t T = a.T, D = a.D, Dp = a.Dp, Tp = a.Tp;
    std::vector<float> qp(T * Dp), kp(T * Dp), kt(Dp * Tp), vp(T * Dp), vt(Dp * Tp), dop(T * Dp), op(T * Dp);
    std::vector<float> p(T * Tp), ds(T * Tp), gq(kRows * Dp), gk(T * Dp), gv(T * Dp);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / a.Hk, g = task % a.Hk;
      load_head(x, b, a.H + g, T, D, Tp, Dp, kp.data(), kt.data());
      load_head(x, b, a.H + a.Hk + g, T, D, Tp, Dp, vp.data(), vt.data());
      std::fill(gk.begin(), gk.end(), 0.f);
      std::fill(gv.begin(), gv.end(), 0.f);
      for (int64_t h = g * a.group; h < (g + 1) * a.group; ++h) {
        load_head(x, b, h, T, D, Tp, Dp, qp.data(), nullptr);
        load_head(go, b, h, T, D, Tp, Dp, dop.data(), nullptr);
        load_head(out, b, h, T, D, Tp, Dp, op.data(), nullptr);
        float* lse_row = lse.data_ptr<float>() + (b * a.H + h) * T;
        for (int64_t i0 = 0; i0 < T; i0 += kRows) {
          const int rows = (int)std::min<int64_t>(kRows, T - i0);
          const int64_t keys = i0 + rows, cols = round_up(keys, L);
          float *pr = &p[i0 * Tp], *dsr = &ds[i0 * Tp];
          probabilities(qp.data(), Dp, kt.data(), D, Tp, i0, rows, a.scale, pr, lse_row, false);
          std::fill(dsr, dsr + rows * Tp, 0.f);
          tile_rows(rows, {&dop[i0 * Dp], Dp, 1}, vt.data(), Tp, dsr, Tp, 0, D, cols, 1.f);  // dp
          for (int r = 0; r < rows; ++r) {
            const int64_t i = i0 + r;
            VF dot = vzero();  // sum_d dout[i, d] o[i, d]: the softmax backward's row term
            for (int64_t d = 0; d < Dp; d += L) dot = vfma(vload(&dop[i * Dp + d]), vload(&op[i * Dp + d]), dot);
            const VF di = vset1(vsum(dot)), sc = vset1(a.scale);
            for (int64_t j = 0; j < cols; j += L) {  // p is 0 past key i, so ds is too
              float* d = dsr + r * Tp + j;
              vstore(d, vmul(vmul(vload(pr + r * Tp + j), vsub(vload(d), di)), sc));
            }
          }
          std::fill(gq.begin(), gq.end(), 0.f);
          tile_rows(rows, {dsr, Tp, 1}, kp.data(), Dp, gq.data(), Dp, 0, keys, Dp, 1.f);  // dq = ds k
          for (int r = 0; r < rows; ++r) std::copy(&gq[r * Dp], &gq[r * Dp] + D, gx.row(b, i0 + r, h));
        }
        for (int64_t j0 = 0; j0 < T; j0 += kRows) {  // key j: from queries i >= j
          const int rows = (int)std::min<int64_t>(kRows, T - j0);
          tile_rows(rows, {&ds[j0], 1, Tp}, qp.data(), Dp, &gk[j0 * Dp], Dp, j0, T, Dp, 1.f);   // dk += ds^T q
          tile_rows(rows, {&p[j0], 1, Tp}, dop.data(), Dp, &gv[j0 * Dp], Dp, j0, T, Dp, 1.f);  // dv += p^T dout
        }
      }
      for (int64_t j = 0; j < T; ++j) {
        std::copy(&gk[j * Dp], &gk[j * Dp] + D, gx.row(b, j, a.H + g));
        std::copy(&gv[j * Dp], &gv[j * Dp] + D, gx.row(b, j, a.H + a.Hk + g));
      }
    }
  });
  return grad;
}

// Flush-to-zero and denormals-are-zero on or off in every thread of the OpenMP pool the
// ATen kernels run on (they keep it: the pool's threads live on) and in the calling thread,
// which is the pool's thread 0. Returns whether the calling thread had them on before.
bool flush_denormals(bool on) {
#if defined(__x86_64__) || defined(__i386__)
  const bool was = (_mm_getcsr() & 0x8040) == 0x8040;
#pragma omp parallel num_threads(at::get_num_threads())
  { _mm_setcsr(on ? (_mm_getcsr() | 0x8040) : (_mm_getcsr() & ~0x8040u)); }
  return was;
#else
  return false;
#endif
}

}  // namespace

void register_train_kernels(pybind11::module_& m) {
  m.def("flush_denormals", &flush_denormals, "FTZ/DAZ on or off in every pool thread; returns the previous state");
  m.def("gelu_forward", &gelu_forward, "[y] or with derivative [y, dy/dx] of y = x * sigmoid(2 sqrt(2/pi) "
        "(x + 0.044715 x^3)): GELU, tanh form", py::arg("x"), py::arg("derivative") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("attention_forward", &attention_forward, "causal attention of qkv (B, T, nh + 2 nkv, D): "
        "(o (B, T, nh, D), lse (B, nh, T))", py::call_guard<py::gil_scoped_release>());
  m.def("attention_backward", &attention_backward, "the gradient of attention_forward, shaped like qkv",
        py::call_guard<py::gil_scoped_release>());
}
