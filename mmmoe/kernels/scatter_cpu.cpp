// Row scatter-add into a fresh tensor without zero-filling it first (float32, CPU): the routed
// experts add each block's output rows into the sub-token rows they came from. Built at first use
// by mmmoe/kernels/__init__.py.
//
// A stamp per destination row (int32) records the last call that wrote it, -1 for none yet: a
// row's first contribution is copied, later ones are added, so out never needs zeroing (a pass
// over the whole output), and zero_untouched_rows zeroes the rows no call wrote. For each row the
// contributions are combined in call order and, within a call, in index order: the result equals
// zeros(...).index_add_(0, index, src) over the same calls (0 + x is x, except that a first
// contribution of -0.0 stays -0.0).

#include "cpu_common.h"

#include <cstring>
#include <vector>

namespace mmmoe_cpu {
namespace {

constexpr const char* kOp = "mmmoe scatter_rows";
constexpr int64_t kCols = 16;  // columns per task when a call's rows must be split by column

inline void add_row(float* dst, const float* src, int64_t c0, int64_t c1) {
  int64_t j = c0;
  for (; j + Vec::size() <= c1; j += Vec::size()) (Vec::loadu(dst + j) + Vec::loadu(src + j)).store(dst + j);
  for (; j < c1; ++j) dst[j] += src[j];
}

// Checks out (n x D float32) and its stamp (n int32, contiguous); returns D.
int64_t check_out(const at::Tensor& out, const at::Tensor& stamp) {
  TORCH_CHECK(out.dim() == 2, kOp, ": out must be a matrix, got ", out.sizes());
  const int64_t n = out.size(0), D = out.size(1);
  check_rows(out, kOp, "out", n, D);
  TORCH_CHECK(stamp.device().is_cpu() && stamp.scalar_type() == at::kInt && stamp.dim() == 1 &&
                  stamp.size(0) == n && stamp.is_contiguous(),
              kOp, ": stamp must be a contiguous int32 CPU vector of ", n, " rows, got ", stamp.scalar_type(), " ",
              stamp.sizes());
  return D;
}

// out[index[i]] := src[i] when the row has no contribution yet (stamp -1), else += src[i]; the
// rows' stamps become `call` (>= 0, a new value for each call on the same out and stamp).
void scatter_rows(const at::Tensor& out, const at::Tensor& index, const at::Tensor& src, const at::Tensor& stamp,
                  int64_t call) {
  const int64_t D = check_out(out, stamp), n = out.size(0);
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.dim() == 1, kOp,
              ": index must be an int64 CPU vector, got ", index.scalar_type(), " ", index.sizes());
  const int64_t m = index.size(0);
  check_rows(src, kOp, "src", m, D);
  TORCH_CHECK(call >= 0 && call <= INT32_MAX, kOp, ": call must be in [0, 2^31), got ", call);
  if (m == 0) return;
  const int64_t* ip = index.const_data_ptr<int64_t>();
  const int64_t is = index.stride(0);
  int32_t* sp = stamp.data_ptr<int32_t>();
  for (int64_t i = 0; i < m; ++i) {  // all checked before any stamp changes: an error leaves no trace
    const int64_t t = ip[i * is];
    TORCH_CHECK(t >= 0 && t < n, kOp, ": index ", t, " out of range [0, ", n, ")");
  }
  // one pass in order: which contributions come first to their row, and whether a row repeats
  std::vector<uint8_t> first(m);
  bool repeats = false;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t t = ip[i * is];
    repeats |= sp[t] == call;
    first[i] = sp[t] < 0;
    sp[t] = static_cast<int32_t>(call);
  }
  float* op = out.data_ptr<float>();
  const float* srp = src.const_data_ptr<float>();
  const int64_t os = out.stride(0), ss = src.stride(0);
  auto row = [&](int64_t i, int64_t c0, int64_t c1) {
    float* dst = op + ip[i * is] * os;
    const float* s = srp + i * ss;
    if (first[i])
      std::memcpy(dst + c0, s + c0, sizeof(float) * (c1 - c0));
    else
      add_row(dst, s, c0, c1);
  };
  if (!repeats) {  // every row written once: any split of the rows gives the same result
    for_rows(m, D, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) row(i, 0, D);
    });
  } else {  // a row written twice: each task takes a range of columns and every row in order
    const int64_t tasks = (D + kCols - 1) / kCols;
    for_rows(tasks, m * kCols, [&](int64_t c0, int64_t c1) {
      const int64_t lo = c0 * kCols, hi = std::min(D, c1 * kCols);
      for (int64_t i = 0; i < m; ++i) row(i, lo, hi);
    });
  }
}

// Zeroes the rows of out no scatter_rows call wrote (stamp -1).
void zero_untouched_rows(const at::Tensor& out, const at::Tensor& stamp) {
  const int64_t D = check_out(out, stamp), n = out.size(0);
  const int32_t* sp = stamp.const_data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const int64_t os = out.stride(0);
  for_rows(n, D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      if (sp[r] < 0) std::fill(op + r * os, op + r * os + D, 0.0f);
  });
}

}  // namespace
}  // namespace mmmoe_cpu

TORCH_LIBRARY_FRAGMENT(mmmoe_cpu, m) {
  m.def("scatter_rows(Tensor(a!) out, Tensor index, Tensor src, Tensor(b!) stamp, int call) -> ()");
  m.def("zero_untouched_rows(Tensor(a!) out, Tensor stamp) -> ()");
}

TORCH_LIBRARY_IMPL(mmmoe_cpu, CPU, m) {
  m.impl("scatter_rows", &mmmoe_cpu::scatter_rows);
  m.impl("zero_untouched_rows", &mmmoe_cpu::zero_untouched_rows);
}
