// Fused SwiGLU forward and backward for float32 on CPU (one pass over memory instead of two in
// forward and five in backward). Built at first use by mmmoe/kernels/__init__.py.
//
// Layout: h is m x 2F with rows [a | b] (any row stride, unit column stride); silu(a) * b is the
// activation. Every value is computed with the same operations, in the same order, as ATen's silu,
// silu_backward and mul kernels (vectorised chunks of 2 vectors, a scalar remainder per row), and
// rows are never split between threads, so results do not depend on the thread count.

#include "cpu_common.h"

#include <ATen/cpu/vec/functional.h>

namespace mmmoe_cpu {
namespace {

constexpr const char* kOp = "mmmoe swiglu";

inline float silu_scalar(float x) { return x / (1.0f + std::exp(-x)); }

// Checks h (m x 2F, halves [a | b]) and returns F.
int64_t half_width(const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0, "mmmoe swiglu: h must be m x 2F, got ", h.sizes());
  check_rows(h, kOp, "h", h.size(0), h.size(1));
  return h.size(1) / 2;
}

// For every row r of m (threads take whole rows) and every column j of [0, F): vec(r, j) on each
// vector of a row in ATen's order (chunks of 2 vectors), then scalar(r, j) on the remainder.
template <typename V, typename S>
void for_columns(int64_t m, int64_t F, const V& vec, const S& scalar) {
  for_rows(m, F, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t j = 0;
      for (; j + kChunk <= F; j += kChunk)
        for (int64_t k = 0; k < kChunk; k += Vec::size()) vec(r, j + k);
      for (; j < F; ++j) scalar(r, j);
    }
  });
}

// Checks an optional per-row vector (m floats, any stride) and returns its data, or nullptr.
const float* row_vector(const std::optional<at::Tensor>& v, const char* name, int64_t m, int64_t* stride) {
  if (!v.has_value() || !v->defined()) return nullptr;
  TORCH_CHECK(v->device().is_cpu() && v->scalar_type() == at::kFloat && v->dim() == 1 && v->size(0) == m,
              "mmmoe swiglu: ", name, " must be a float32 CPU vector of ", m, " rows, got ", v->scalar_type(),
              " ", v->sizes());
  *stride = v->stride(0);
  return v->const_data_ptr<float>();
}

// out = silu(a) * b, times the row's gate when one is given (ATen: silu(a).mul_(b).mul_(gate))
void swiglu_forward(const at::Tensor& h, const at::Tensor& out, const std::optional<at::Tensor>& gate) {
  const int64_t F = half_width(h), m = h.size(0);
  check_rows(out, kOp, "out", m, F);
  int64_t gs = 0;
  const float* g = row_vector(gate, "gate", m, &gs);
  const float* hp = h.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t hs = h.stride(0), os = out.stride(0);
  const Vec one(1.0f);
  for_columns(m, F,
      [&](int64_t r, int64_t j) {
        const float* a = hp + r * hs + j;
        const Vec x = Vec::loadu(a);
        const Vec s = x / (one + x.neg().exp());
        const Vec p = s * Vec::loadu(a + F);
        (g ? p * Vec(g[r * gs]) : p).store(op + r * os + j);
      },
      [&](int64_t r, int64_t j) {
        const float* a = hp + r * hs + j;
        const float p = silu_scalar(a[0]) * a[F];
        op[r * os + j] = g ? p * g[r * gs] : p;
      });
}

// Given dp (the gradient of silu(a) * b), writes the gradient of h = [a | b], [da | db], into dh
// (when defined; else over h) and, when p is defined, the activation silu(a) * b into p (the input
// of the second matmul, needed for that matmul's weight gradient).
//   t = dp * b;  da = t * sig(a) * (1 + a * (1 - sig(a)));  db = dp * silu(a)
// With a per-row gate g (the routed experts, whose output is g * silu(a) * b): dp is the gradient
// of that gated output, and the kernel also takes dp := dp * g first, writes g * silu(a) * b into p
// and, when dgate is defined, the gate's gradient: the dot product of the given dp and silu(a) * b
// (one vector accumulator per row over its vectors, then its lanes, then the scalar remainder).
void swiglu_backward(const at::Tensor& h, const at::Tensor& dp, const std::optional<at::Tensor>& p,
                     const std::optional<at::Tensor>& dh, const std::optional<at::Tensor>& gate,
                     const std::optional<at::Tensor>& dgate) {
  const int64_t F = half_width(h), m = h.size(0);
  check_rows(dp, kOp, "dp", m, F);
  const bool want_p = p.has_value() && p->defined();
  if (want_p) check_rows(*p, kOp, "p", m, F);
  const bool separate = dh.has_value() && dh->defined();
  if (separate) check_rows(*dh, kOp, "dh", m, 2 * F);
  int64_t gst = 0, dgst = 0;
  const float* g = row_vector(gate, "gate", m, &gst);
  float* dg = row_vector(dgate, "dgate", m, &dgst) ? dgate->data_ptr<float>() : nullptr;
  TORCH_CHECK(dg == nullptr || g != nullptr, "mmmoe swiglu: dgate needs gate");
  const float* hp = h.const_data_ptr<float>();
  float* gp = separate ? dh->data_ptr<float>() : h.data_ptr<float>();
  const float* dpp = dp.const_data_ptr<float>();
  float* pp = want_p ? p->data_ptr<float>() : nullptr;
  const int64_t hs = h.stride(0), gs = separate ? dh->stride(0) : hs, ds = dp.stride(0), ps = want_p ? p->stride(0) : 0;
  const Vec one(1.0f);
  for_rows(m, F, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* arow = hp + r * hs;
      float* garow = gp + r * gs;
      const float* drow = dpp + r * ds;
      float* prow = pp ? pp + r * ps : nullptr;
      const float gr = g ? g[r * gst] : 1.0f;
      Vec acc(0.0f);
      int64_t j = 0;
      for (; j + kChunk <= F; j += kChunk) {
        for (int64_t k = j; k < j + kChunk; k += Vec::size()) {
          const Vec x = Vec::loadu(arow + k);
          const Vec y = Vec::loadu(arow + k + F);
          const Vec d0 = Vec::loadu(drow + k);
          const Vec d = g ? d0 * Vec(gr) : d0;
          const Vec e = x.neg().exp();
          const Vec s = x / (one + e);
          const Vec sig = one / (one + e);
          const Vec t = d * y;
          const Vec act = s * y;
          if (dg) acc = acc + d0 * act;
          if (prow) (g ? act * Vec(gr) : act).store(prow + k);
          (t * sig * (one + x * (one - sig))).store(garow + k);
          (d * s).store(garow + k + F);
        }
      }
      float dot = dg ? at::vec::vec_reduce_all([](Vec& u, Vec& v) { return u + v; }, acc) : 0.0f;
      for (; j < F; ++j) {
        const float x = arow[j], y = arow[j + F], d0 = drow[j];
        const float d = g ? d0 * gr : d0;
        const float s = silu_scalar(x);
        const float sig = 1.0f / (1.0f + std::exp(-x));
        const float t = d * y;
        const float act = s * y;
        if (dg) dot += d0 * act;
        if (prow) prow[j] = g ? act * gr : act;
        garow[j] = t * sig * (1.0f + x * (1.0f - sig));
        garow[j + F] = d * s;
      }
      if (dg) dg[r * dgst] = dot;
    }
  });
}

}  // namespace
}  // namespace mmmoe_cpu

TORCH_LIBRARY(mmmoe_cpu, m) {
  m.def("swiglu_forward(Tensor h, Tensor(a!) out, Tensor? gate=None) -> ()");
  m.def("swiglu_backward(Tensor(a!) h, Tensor dp, Tensor(b!)? p, Tensor(c!)? dh, Tensor? gate=None, Tensor(d!)? dgate=None) -> ()");
}

TORCH_LIBRARY_IMPL(mmmoe_cpu, CPU, m) {
  m.impl("swiglu_forward", &mmmoe_cpu::swiglu_forward);
  m.impl("swiglu_backward", &mmmoe_cpu::swiglu_backward);
}
