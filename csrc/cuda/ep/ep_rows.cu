// Expert-parallel packing on the GPU: byte-row copies between tensors and the exchange buffer, and the rank-ordered
// fp32 reduction of combined rows. Bit-exact with the CPU kernels: copies move raw bytes, and each output element of
// the reduction is a chain of fp32 additions (explicit __fadd_rn: no contraction) in rank order starting from +0.
// Index values outside their range are treated as -1 (the row is skipped): the GPU never reads or writes out of
// bounds, whatever the indices say.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/element_types.cuh"
#include "dsv3/ep_params.h"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 128;

// One CTA per copied row; Vector (16, 8, 4, 2 or 1 bytes) divides the span, both strides, both offsets and the base
// addresses, so every access is aligned.
template <typename Vector>
__global__ void __launch_bounds__(kThreads)
    copy_rows_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, const int64_t* __restrict__ src_index,
                     const int64_t* __restrict__ dst_index, int64_t src_rows, int64_t dst_rows, int64_t src_stride,
                     int64_t dst_stride, int64_t src_offset, int64_t dst_offset, int64_t vectors) {
  const int64_t i = blockIdx.x;
  const int64_t s = src_index ? src_index[i] : i;
  const int64_t d = dst_index ? dst_index[i] : i;
  if (s < 0 || s >= src_rows || d < 0 || d >= dst_rows) return;
  const auto* from = reinterpret_cast<const Vector*>(src + s * src_stride + src_offset);
  auto* to = reinterpret_cast<Vector*>(dst + d * dst_stride + dst_offset);
  for (int64_t v = threadIdx.x; v < vectors; v += kThreads) to[v] = from[v];
}

__global__ void zero_kernel(float* __restrict__ out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) out[i] = 0.0f;
}

// Rows [first, last) of one source rank, whose tokens are distinct: grid (rows, column blocks), one element each.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    add_rows_kernel(const uint8_t* __restrict__ src, const int64_t* __restrict__ token, float* __restrict__ out,
                    int64_t first, int64_t tokens, int64_t cols, int64_t src_stride, int64_t src_offset) {
  const int64_t i = first + blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t t = token[i];
  if (c >= cols || t < 0 || t >= tokens) return;
  const auto* values = reinterpret_cast<const T*>(src + i * src_stride + src_offset);
  float* sum = out + t * cols + c;
  *sum = __fadd_rn(*sum, to_float(values[c]));
}

template <typename Vector>
void launch_copy(const EpCopyRowsParams& p, cudaStream_t stream) {
  copy_rows_kernel<Vector><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(
      p.src, p.dst, p.src_index, p.dst_index, p.src_rows, p.dst_rows, p.src_stride, p.dst_stride, p.src_offset,
      p.dst_offset, p.row_bytes / static_cast<int64_t>(sizeof(Vector)));
}

}  // namespace

void ep_copy_rows(const EpCopyRowsParams& params, std::uintptr_t stream_handle) {
  params.validate();
  if (params.rows == 0 || params.row_bytes == 0) return;
  DSV3_CHECK(params.rows <= 0x7FFFFFFF, "ep_copy_rows: too many rows (", params.rows, ")");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  // The widest unit every address and length is a multiple of.
  const auto bits = static_cast<uint64_t>(params.row_bytes | params.src_stride | params.dst_stride | params.src_offset |
                                          params.dst_offset) |
                    reinterpret_cast<std::uintptr_t>(params.src) | reinterpret_cast<std::uintptr_t>(params.dst);
  if (bits % 16 == 0) {
    launch_copy<uint4>(params, stream);
  } else if (bits % 8 == 0) {
    launch_copy<uint2>(params, stream);
  } else if (bits % 4 == 0) {
    launch_copy<uint32_t>(params, stream);
  } else if (bits % 2 == 0) {
    launch_copy<uint16_t>(params, stream);
  } else {
    launch_copy<uint8_t>(params, stream);
  }
  DSV3_CUDA_CHECK(cudaGetLastError());
}

void ep_combine_reduce(const EpCombineParams& params, std::uintptr_t stream_handle) {
  params.validate();
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t elements = params.tokens * params.cols;
  if (elements == 0) return;
  zero_kernel<<<static_cast<unsigned>((elements + kThreads - 1) / kThreads), kThreads, 0, stream>>>(params.out,
                                                                                                    elements);
  const auto column_blocks = static_cast<unsigned>((params.cols + kThreads - 1) / kThreads);
  DSV3_CHECK(column_blocks <= 65535, "ep_combine_reduce: too many columns (", params.cols, ")");
  // Ranks in order, one launch each: stream order makes every element's additions happen in rank order.
  for (int64_t r = 0; r < params.num_ranks; ++r) {
    const int64_t first = params.rank_offsets[r], count = params.rank_offsets[r + 1] - first;
    if (count == 0) continue;
    DSV3_CHECK(count <= 0x7FFFFFFF, "ep_combine_reduce: too many rows (", count, ")");
    dispatch_float_type(params.src_dtype, [&](auto type) {
      using T = decltype(type);
      add_rows_kernel<T><<<dim3(static_cast<unsigned>(count), column_blocks), kThreads, 0, stream>>>(
          params.src, params.token, params.out, first, params.tokens, params.cols, params.src_stride,
          params.src_offset);
    });
  }
  DSV3_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv3::cuda
