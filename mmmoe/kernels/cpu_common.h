// Helpers shared by the fused CPU kernels of mmmoe (swiglu_cpu.cpp, route_cpu.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace mmmoe_cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 2 * Vec::size();

// Checks that t is a float32 CPU matrix rows x cols with unit column stride; errors name op and t.
inline void check_rows(const at::Tensor& t, const char* op, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name, " must be ", rows, " x ",
              cols, ", got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || cols <= 1, op, ": ", name, " needs unit column stride");
}

// Runs fn(r0, r1) over row ranges on ATen's intra-op threads, split by whole rows (so results do
// not depend on the thread count); cols is the work per row, for the grain size. A TensorIterator
// over a dummy row vector does the splitting: at::parallel_for is inline and would need these files
// compiled against the same OpenMP runtime as ATen, for_each runs inside libtorch's own pool.
template <typename Fn>
void for_rows(int64_t m, int64_t cols, const Fn& fn) {
  if (m <= 0) return;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(cols, 1));
  at::Tensor rows = at::empty({m}, at::TensorOptions().dtype(at::kByte));
  const char* base = static_cast<const char*>(rows.const_data_ptr());
  auto iter = at::TensorIteratorConfig().add_output(rows).check_all_same_dtype(false).resize_outputs(false).build();
  iter.for_each([&](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
    TORCH_INTERNAL_ASSERT(size1 == 1 && (size0 <= 1 || strides[0] == 1));
    const int64_t r0 = data[0] - base;
    fn(r0, r0 + size0);
  }, grain);
}

}  // namespace mmmoe_cpu
