// Device-side row extents of the groups of a grouped FP8 GEMM (cuda/gemm/group_rows.cuh).

#include "cuda/gemm/group_rows.cuh"

#include <algorithm>
#include <climits>

#include "cuda/cuda_check.h"

namespace dsv3::cuda {
namespace {

__global__ void reset_group_rows(GroupRows g, int64_t groups) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (group >= groups) return;
  g.first_row[group] = INT_MAX;
  g.last_row[group] = -1;
  g.rows[group] = 0;
}

// Indices outside [0, groups) are padding.
__global__ void find_group_rows(const int32_t* __restrict__ m_indices, int64_t m_sum, int64_t groups, GroupRows g) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < m_sum;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t group = m_indices[row];
    if (group < 0 || group >= groups) continue;
    atomicMin(g.first_row + group, static_cast<int32_t>(row));
    atomicMax(g.last_row + group, static_cast<int32_t>(row));
    atomicAdd(g.rows + group, 1);
  }
}

__global__ void zero_rows_without_group(GroupedFp8GemmParams p, const int32_t* rows) {
  const int64_t row = blockIdx.x;
  const int32_t group = p.m_indices[row];
  if (group >= 0 && group < p.groups && rows[group] > 0) return;
  for (int64_t col = threadIdx.x; col < p.n; col += blockDim.x) p.out[row * p.n + col] = 0;
}

}  // namespace

void find_contiguous_group_rows(const GroupedFp8GemmParams& p, GroupRows g, int num_sms, cudaStream_t stream) {
  reset_group_rows<<<static_cast<unsigned>((p.groups + 127) / 128), 128, 0, stream>>>(g, p.groups);
  if (p.m > 0) {
    const auto blocks = static_cast<unsigned>(std::min<int64_t>((p.m + 255) / 256, 4 * num_sms));
    find_group_rows<<<blocks, 256, 0, stream>>>(p.m_indices, p.m, p.groups, g);
  }
  DSV3_CUDA_CHECK(cudaGetLastError());
}

void zero_uncomputed_rows(const GroupedFp8GemmParams& p, const int32_t* rows, cudaStream_t stream) {
  if (p.m == 0) return;
  zero_rows_without_group<<<static_cast<unsigned>(p.m), 128, 0, stream>>>(p, rows);
  DSV3_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv3::cuda
