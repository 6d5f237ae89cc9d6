// MoE token layouts on the GPU without a host synchronization: a stable counting sort of the (token, slot) entries
// by expert, in three kernels.
//
//   count:   one warp per chunk of kMoeLayoutChunk entries counts each expert's entries into workspace[chunk][e];
//   offsets: one block, a thread per expert, turns the workspace into each chunk's first rank for that expert
//            (an exclusive scan over chunks), and the totals into tokens_per_expert, masked_m and expert_offsets
//            (an exclusive scan over experts of the padded counts);
//   scatter: one warp per chunk walks its entries 32 at a time in order; lanes holding the same expert find their
//            rank among themselves with __match_any_sync, so every expert's rows come out in (token, slot) order.
//
// Entries whose expert lies outside [-1, E) take no row and are counted in errors[0]; masked, entries ranked past
// max_m take no row and are counted in errors[1]. Every row written lies inside the allocated outputs.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "dsv3/moe_params.h"

namespace dsv3::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kMaxThreads = 1024;

template <typename Index>
__device__ __forceinline__ int expert_at(const Index* topk_idx, int64_t i, int num_experts, bool* out_of_range) {
  const int64_t e = static_cast<int64_t>(topk_idx[i]);
  *out_of_range = e < -1 || e >= num_experts;
  return e >= 0 && e < num_experts ? static_cast<int>(e) : -1;
}

template <typename Index>
__global__ void layout_count_kernel(const Index* __restrict__ topk_idx, int64_t entries, int num_experts,
                                    int32_t* __restrict__ chunk_counts, int32_t* __restrict__ errors) {
  extern __shared__ int32_t counts[];  // [num_experts]
  const int lane = threadIdx.x;
  for (int e = lane; e < num_experts; e += kWarpSize) counts[e] = 0;
  __syncwarp();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kMoeLayoutChunk;
  const int64_t end = min(begin + kMoeLayoutChunk, entries);
  int bad = 0;
  for (int64_t i = begin + lane; i < end; i += kWarpSize) {
    bool out_of_range;
    const int e = expert_at(topk_idx, i, num_experts, &out_of_range);
    if (e >= 0) atomicAdd(&counts[e], 1);
    bad += out_of_range ? 1 : 0;
  }
  __syncwarp();
  for (int e = lane; e < num_experts; e += kWarpSize)
    chunk_counts[static_cast<int64_t>(blockIdx.x) * num_experts + e] = counts[e];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) bad += __shfl_xor_sync(kFullMask, bad, offset);
  if (lane == 0 && bad) atomicAdd(&errors[0], bad);
}

// Exclusive prefix sum of one value per thread over the block (blockDim.x a multiple of 32, at most 1024).
__device__ int64_t block_exclusive_scan(int64_t value, int64_t* warp_totals) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  int64_t inclusive = value;
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int64_t up = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == kWarpSize - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarpSize;
    int64_t total = lane < warps ? warp_totals[lane] : 0;
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const int64_t up = __shfl_up_sync(kFullMask, total, offset);
      if (lane >= offset) total += up;
    }
    if (lane < warps) warp_totals[lane] = total;  // inclusive over warps
  }
  __syncthreads();
  return inclusive - value + (warp > 0 ? warp_totals[warp - 1] : 0);
}

__global__ void layout_offsets_kernel(int32_t* __restrict__ chunk_counts, int64_t chunks, int num_experts, bool masked,
                                      int64_t alignment, int64_t max_m, int32_t* __restrict__ tokens_per_expert,
                                      int64_t* __restrict__ expert_offsets, int32_t* __restrict__ masked_m,
                                      int32_t* __restrict__ errors) {
  __shared__ int64_t warp_totals[kMaxThreads / kWarpSize];
  const int e = threadIdx.x;
  int32_t total = 0;
  if (e < num_experts) {
    for (int64_t c = 0; c < chunks; ++c) {
      int32_t* count = chunk_counts + c * num_experts + e;
      const int32_t n = *count;
      *count = total;  // this chunk's first rank among expert e's entries
      total += n;
    }
    tokens_per_expert[e] = total;
  }
  if (masked) {
    if (e < num_experts) {
      masked_m[e] = static_cast<int32_t>(total < max_m ? total : max_m);
      if (total > max_m) atomicAdd(&errors[1], static_cast<int32_t>(total - max_m));
    }
    return;
  }
  const int64_t padded = e < num_experts ? (total + alignment - 1) / alignment * alignment : 0;
  const int64_t start = block_exclusive_scan(padded, warp_totals);
  if (e < num_experts) expert_offsets[e] = start;
  if (e == num_experts - 1) expert_offsets[num_experts] = start + padded;
}

template <typename Index>
__global__ void layout_scatter_kernel(const Index* __restrict__ topk_idx, int64_t entries, int topk, int num_experts,
                                      const int32_t* __restrict__ chunk_counts,
                                      const int64_t* __restrict__ expert_offsets, bool masked, int64_t max_m,
                                      int64_t rows, int32_t* __restrict__ m_indices, int64_t* __restrict__ src_token,
                                      int64_t* __restrict__ src_slot, int64_t* __restrict__ row_of) {
  extern __shared__ int32_t next_rank[];  // [num_experts]: rank of the expert's next entry
  const int lane = threadIdx.x;
  for (int e = lane; e < num_experts; e += kWarpSize)
    next_rank[e] = chunk_counts[static_cast<int64_t>(blockIdx.x) * num_experts + e];
  __syncwarp();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kMoeLayoutChunk;
  const int64_t end = min(begin + kMoeLayoutChunk, entries);
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t wave = begin; wave < end; wave += kWarpSize) {
    const int64_t i = wave + lane;
    bool out_of_range;
    const int e = i < end ? expert_at(topk_idx, i, num_experts, &out_of_range) : -1;
    // Lanes without an expert get keys no other lane has, so they never join a group.
    const unsigned peers = __match_any_sync(kFullMask, e >= 0 ? e : num_experts + lane);
    const int rank = e >= 0 ? next_rank[e] + __popc(peers & lanes_below) : 0;
    __syncwarp();
    if (e >= 0 && (peers >> lane) == 1u) next_rank[e] += __popc(peers);  // the group's highest lane advances it
    __syncwarp();
    if (i >= end) continue;
    int64_t row = -1;
    if (e >= 0) {
      row = masked ? (rank < max_m ? e * max_m + rank : -1) : expert_offsets[e] + rank;
      if (row >= rows) row = -1;
    }
    row_of[i] = row;
    if (row < 0) continue;
    src_token[row] = i / topk;
    src_slot[row] = i % topk;
    if (!masked) m_indices[row] = e;
  }
}

}  // namespace

void moe_layout_count(const MoeLayoutParams& p, std::uintptr_t stream_handle) {
  validate(p);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t entries = p.tokens * p.topk, chunks = moe_layout_chunks(entries);
  DSV3_CHECK(p.errors && (chunks == 0 || p.workspace), "errors/workspace: null pointer");
  DSV3_CHECK(chunks <= 0x7FFFFFFF, "topk_idx: too many entries (", entries, ")");
  const int experts = static_cast<int>(p.num_experts);
  DSV3_CUDA_CHECK(cudaMemsetAsync(p.errors, 0, 2 * sizeof(int32_t), stream));
  if (chunks > 0) {
    dispatch_index_type(p.idx_int64, [&](auto index) {
      using Index = decltype(index);
      layout_count_kernel<Index><<<static_cast<unsigned>(chunks), kWarpSize, experts * sizeof(int32_t), stream>>>(
          static_cast<const Index*>(p.topk_idx), entries, experts, p.workspace, p.errors);
    });
    DSV3_CUDA_CHECK(cudaGetLastError());
  }
  const int threads = (experts + kWarpSize - 1) / kWarpSize * kWarpSize;
  layout_offsets_kernel<<<1, threads, 0, stream>>>(p.workspace, chunks, experts, p.masked, p.alignment, p.max_m,
                                                   p.tokens_per_expert, p.expert_offsets, p.masked_m, p.errors);
  DSV3_CUDA_CHECK(cudaGetLastError());
}

void moe_layout_scatter(const MoeLayoutParams& p, std::uintptr_t stream_handle) {
  validate(p);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t entries = p.tokens * p.topk, chunks = moe_layout_chunks(entries);
  DSV3_CHECK(chunks == 0 || (p.workspace && p.row_of), "workspace/row_of: null pointer");
  DSV3_CHECK(p.rows == 0 || (p.src_token && p.src_slot && (p.masked || p.m_indices)),
             "m_indices/src_token/src_slot: null pointer");
  DSV3_CHECK(chunks <= 0x7FFFFFFF, "topk_idx: too many entries (", entries, ")");
  // -1 in int32 and int64 is all bits set: padding rows, and rows past M_sum, keep it.
  if (p.rows > 0) {
    DSV3_CUDA_CHECK(cudaMemsetAsync(p.src_token, 0xFF, p.rows * sizeof(int64_t), stream));
    DSV3_CUDA_CHECK(cudaMemsetAsync(p.src_slot, 0xFF, p.rows * sizeof(int64_t), stream));
    if (!p.masked) DSV3_CUDA_CHECK(cudaMemsetAsync(p.m_indices, 0xFF, p.rows * sizeof(int32_t), stream));
  }
  if (chunks == 0) return;
  const int experts = static_cast<int>(p.num_experts);
  dispatch_index_type(p.idx_int64, [&](auto index) {
    using Index = decltype(index);
    layout_scatter_kernel<Index><<<static_cast<unsigned>(chunks), kWarpSize, experts * sizeof(int32_t), stream>>>(
        static_cast<const Index*>(p.topk_idx), entries, static_cast<int>(p.topk), experts, p.workspace,
        p.expert_offsets, p.masked, p.max_m, p.rows, p.m_indices, p.src_token, p.src_slot, p.row_of);
  });
  DSV3_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv3::cuda
