// Fused router kernels for float32 on CPU: softmax over experts, top-k selection, gates and the
// log-sum-exp of each row in one pass, and the gradient of all of them in one pass back. Built at
// first use by mmmoe/kernels/__init__.py, with swiglu_cpu.cpp.
//
// The probabilities are computed with the operations of ATen's softmax over the last dimension of
// a float32 tensor (per row: the maximum, exp(x - max), their sum, times 1 / sum; with ATen's vector
// helpers), so they are bitwise torch.softmax's on the machines tested and selections equal
// torch.topk's except between exactly equal scores, where the lower expert index wins here.

#include "cpu_common.h"

#include <ATen/cpu/vec/functional.h>

#include <limits>
#include <vector>

namespace mmmoe_cpu {
namespace {

constexpr const char* kOp = "mmmoe route";

// true when score a ranks above score b for top-k: larger, NaN counting as largest (torch.topk)
inline bool ranks_above(float a, float b) { return (a > b) || (std::isnan(a) && !std::isnan(b)); }

// Top-k of sc[0, E) by k passes of a vector maximum, each taking the first index holding it
// (ties: the lower index) and overwriting it with -inf; sc is clobbered. Returns false, leaving
// the choice to select_by_insertion, when a maximum is NaN or -inf (where overwritten entries
// would be indistinguishable from the rest).
inline bool select_by_max(float* sc, int64_t E, int64_t k, int64_t* best_i) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < k; ++j) {
    const float m = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, sc, E);
    if (std::isnan(m) || m == ninf) return false;
    int64_t e = 0;
    while (sc[e] != m) ++e;
    best_i[j] = e;
    sc[e] = ninf;
  }
  return true;
}

// Top-k of sc[0, E) in one pass keeping the best k so far in order; a new score goes behind the
// equal ones already kept (ties: the lower index), NaN ranks above everything (as in torch.topk).
inline void select_by_insertion(const float* sc, int64_t E, int64_t k, float* best_v, int64_t* best_i) {
  int64_t n = 0;
  for (int64_t e = 0; e < E; ++e) {
    const float v = sc[e];
    if (n == k && !ranks_above(v, best_v[k - 1])) continue;
    int64_t pos = n < k ? n++ : k - 1;
    while (pos > 0 && ranks_above(v, best_v[pos - 1])) {
      best_v[pos] = best_v[pos - 1];
      best_i[pos] = best_i[pos - 1];
      --pos;
    }
    best_v[pos] = v;
    best_i[pos] = e;
  }
}

// logits: S x E; bias: E or undefined; writes probs (S x E), idx (S x k, int64), gates (S x k)
// and lse (S).
void route_forward(const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t k,
                   const at::Tensor& probs, const at::Tensor& idx, const at::Tensor& gates,
                   const at::Tensor& lse) {
  TORCH_CHECK(logits.dim() == 2, kOp, ": logits must be S x E, got ", logits.sizes());
  const int64_t S = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, kOp, ": top_k must be in [1, ", E, "], got ", k);
  check_rows(logits, kOp, "logits", S, E);
  check_rows(probs, kOp, "probs", S, E);
  check_rows(gates, kOp, "gates", S, k);
  TORCH_CHECK(probs.stride(1) == 1 && probs.stride(0) == E, kOp, ": probs must be contiguous");
  TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == S &&
              idx.size(1) == k, kOp, ": idx must be int64 ", S, " x ", k);
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.dim() == 1 && lse.size(0) == S,
              kOp, ": lse must be float32 of ", S);
  const float* bp = nullptr;
  int64_t bst = 0;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                bias->size(0) == E, kOp, ": bias must be float32 of ", E, ", got ", bias->scalar_type(), " ",
                bias->sizes());
    bp = bias->const_data_ptr<float>();
    bst = bias->stride(0);
  }
  const float* lp = logits.const_data_ptr<float>();
  float* pp = probs.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  float* gp = gates.data_ptr<float>();
  float* sp = lse.data_ptr<float>();
  const int64_t ls = logits.stride(0), is0 = idx.stride(0), is1 = idx.stride(1), gs0 = gates.stride(0),
                gs1 = gates.stride(1), ss = lse.stride(0);
  for_rows(S, 16 * E, [&](int64_t r0, int64_t r1) {
    std::vector<float> work(E), best_v(k);
    std::vector<int64_t> best_i(k);
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = lp + r * ls;
      float* p = pp + r * E;
      const float mx = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, E);
      at::vec::map([mx](Vec v) { return (v - Vec(mx)).exp(); }, p, x, E);
      const float sum = at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, p, E);
      const float inv = 1 / sum;
      at::vec::map([inv](Vec v) { return v * Vec(inv); }, p, p, E);
      sp[r * ss] = mx + std::log(sum);
      // scores (probabilities plus the bias) in a scratch row that the selection may overwrite
      auto fill_scores = [&] {
        for (int64_t e = 0; e < E; ++e) work[e] = bp ? p[e] + bp[e * bst] : p[e];
      };
      fill_scores();
      if (!select_by_max(work.data(), E, k, best_i.data())) {
        fill_scores();  // the failed attempt may have overwritten some
        select_by_insertion(work.data(), E, k, best_v.data(), best_i.data());
      }
      int64_t* ir = ip + r * is0;
      float* gr = gp + r * gs0;
      for (int64_t j = 0; j < k; ++j) {
        ir[j * is1] = best_i[j];
        gr[j * gs1] = p[best_i[j]];
      }
      if (k > 1) {
        float z = gr[0];
        for (int64_t j = 1; j < k; ++j) z += gr[j * gs1];
        for (int64_t j = 0; j < k; ++j) gr[j * gs1] = gr[j * gs1] / z;
      }
    }
  });
}

// The gradient of the logits given those of probs (S x E, any strides), gates (S x k) and lse (S),
// each optional: with G = dprobs + the gates' part (through the renormalisation), dlogits =
// p * (G - sum(p * G) + dlse).
void route_backward(const at::Tensor& probs, const at::Tensor& idx, const std::optional<at::Tensor>& dprobs,
                    const std::optional<at::Tensor>& dgates, const std::optional<at::Tensor>& dlse,
                    const at::Tensor& dlogits) {
  const int64_t S = probs.size(0), E = probs.size(1), k = idx.size(1);
  check_rows(probs, kOp, "probs", S, E);
  check_rows(dlogits, kOp, "dlogits", S, E);
  TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == S &&
              k <= E, kOp, ": idx must be an int64 CPU matrix ", S, " x k (k <= ", E, "), got ", idx.sizes());
  auto opt = [&](const std::optional<at::Tensor>& t, const char* name, int64_t cols) -> const at::Tensor* {
    if (!t.has_value() || !t->defined()) return nullptr;
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, kOp, ": ", name, " must be float32 on CPU");
    if (cols < 0) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == S, kOp, ": ", name, " must have ", S, " rows");
    } else {
      TORCH_CHECK(t->dim() == 2 && t->size(0) == S && t->size(1) == cols, kOp, ": ", name, " must be ", S, " x ", cols);
    }
    return &*t;
  };
  const at::Tensor* dp = opt(dprobs, "dprobs", E);
  const at::Tensor* dg = opt(dgates, "dgates", k);
  const at::Tensor* dl = opt(dlse, "dlse", -1);
  const float* pp = probs.const_data_ptr<float>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  float* op = dlogits.data_ptr<float>();
  const float* dpp = dp ? dp->const_data_ptr<float>() : nullptr;
  const float* dgp = dg ? dg->const_data_ptr<float>() : nullptr;
  const float* dlp = dl ? dl->const_data_ptr<float>() : nullptr;
  const int64_t ps = probs.stride(0), os = dlogits.stride(0), is0 = idx.stride(0), is1 = idx.stride(1);
  const int64_t dps0 = dp ? dp->stride(0) : 0, dps1 = dp ? dp->stride(1) : 0;
  const int64_t dgs0 = dg ? dg->stride(0) : 0, dgs1 = dg ? dg->stride(1) : 0, dls = dl ? dl->stride(0) : 0;
  for_rows(S, 8 * E, [&](int64_t r0, int64_t r1) {
    std::vector<float> G(E);
    for (int64_t r = r0; r < r1; ++r) {
      const float* p = pp + r * ps;
      const int64_t* ir = ip + r * is0;
      for (int64_t e = 0; e < E; ++e) G[e] = dpp ? dpp[r * dps0 + e * dps1] : 0.0f;
      if (dgp) {
        const float* d = dgp + r * dgs0;
        if (k == 1) {
          G[ir[0]] += d[0];
        } else {
          float z = p[ir[0]];
          for (int64_t j = 1; j < k; ++j) z += p[ir[j * is1]];
          float dot = 0.0f;  // sum_j dgate_j * gate_j
          for (int64_t j = 0; j < k; ++j) dot += d[j * dgs1] * (p[ir[j * is1]] / z);
          for (int64_t j = 0; j < k; ++j) G[ir[j * is1]] += (d[j * dgs1] - dot) / z;
        }
      }
      float pg = 0.0f;
      for (int64_t e = 0; e < E; ++e) pg += p[e] * G[e];
      const float shift = (dlp ? dlp[r * dls] : 0.0f) - pg;
      float* o = op + r * os;
      for (int64_t e = 0; e < E; ++e) o[e] = p[e] * (G[e] + shift);
    }
  });
}

// The assignments idx (S x k experts) in choice-major order (a = j * S + s: all first choices in
// sub-token order, then all second choices, ...) sorted by expert, stably (a counting sort, one
// thread): order (S * k) receives the positions a, token (S * k) their sub-tokens s, counts (E) the
// assignments per expert. The same result as a stable argsort and a bincount.
void dispatch_order(const at::Tensor& idx, int64_t E, const at::Tensor& order, const at::Tensor& token,
                    const at::Tensor& counts) {
  TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == at::kLong && idx.dim() == 2, kOp,
              ": idx must be an int64 CPU matrix S x k, got ", idx.scalar_type(), " ", idx.sizes());
  const int64_t S = idx.size(0), k = idx.size(1), A = S * k;
  auto vec1 = [&](const at::Tensor& t, const char* name, int64_t n) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == n &&
                t.is_contiguous(), kOp, ": ", name, " must be a contiguous int64 vector of ", n);
  };
  vec1(order, "order", A);
  vec1(token, "token", A);
  vec1(counts, "counts", E);
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const int64_t s0 = idx.stride(0), s1 = idx.stride(1);
  int64_t* cp = counts.data_ptr<int64_t>();
  std::fill(cp, cp + E, int64_t(0));
  for (int64_t j = 0; j < k; ++j)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t e = ip[s * s0 + j * s1];
      TORCH_CHECK(e >= 0 && e < E, kOp, ": expert index ", e, " out of range [0, ", E, ")");
      ++cp[e];
    }
  std::vector<int64_t> next(E);
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    next[e] = start;
    start += cp[e];
  }
  int64_t* op = order.data_ptr<int64_t>();
  int64_t* tp = token.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t pos = next[ip[s * s0 + j * s1]]++;
      op[pos] = j * S + s;
      tp[pos] = s;
    }
}

}  // namespace
}  // namespace mmmoe_cpu

TORCH_LIBRARY_FRAGMENT(mmmoe_cpu, m) {
  m.def("route_forward(Tensor logits, Tensor? bias, int k, Tensor(a!) probs, Tensor(b!) idx, Tensor(c!) gates, "
        "Tensor(d!) lse) -> ()");
  m.def("route_backward(Tensor probs, Tensor idx, Tensor? dprobs, Tensor? dgates, Tensor? dlse, "
        "Tensor(a!) dlogits) -> ()");
  m.def("dispatch_order(Tensor idx, int num_experts, Tensor(a!) order, Tensor(b!) token, Tensor(c!) counts) -> ()");
}

TORCH_LIBRARY_IMPL(mmmoe_cpu, CPU, m) {
  m.impl("route_forward", &mmmoe_cpu::route_forward);
  m.impl("route_backward", &mmmoe_cpu::route_backward);
  m.impl("dispatch_order", &mmmoe_cpu::dispatch_order);
}
