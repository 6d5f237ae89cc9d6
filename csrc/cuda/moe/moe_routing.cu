// DeepSeek-V3's noaux_tc router on the GPU: one warp per token. Bit-exact with the CPU kernel and dsv3.reference.moe:
// the sigmoid comes from dsv3/moe_routing.h, and every selection step uses its ranks_before order.
//
// A warp's scores live in shared memory (expert e at e + e / 32, so that lane g scanning group g of 32 experts hits
// bank (g + i) % 32: no conflicts). Lane g computes group g's top-2 sum; the kept groups are picked by topk_group
// warp-wide argmax rounds over those lanes; the experts by topk argmax rounds where lane l offers its best unpicked
// expert among l, l + 32, ... of the kept groups. Round k's winner lands in lane k, which writes slot k.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/element_types.cuh"
#include "dsv3/moe_params.h"
#include "dsv3/moe_routing.h"

namespace dsv3::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kWarpsPerBlock = 4;

__host__ __device__ constexpr int padded_slot(int expert) { return expert + expert / kWarpSize; }

struct Candidate {
  float value;
  int index;  // -1: this lane offers nothing
};

// The candidate every lane agrees on (lane 0's result of the butterfly, broadcast): the valid one ranked first.
__device__ Candidate warp_best(Candidate mine) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    Candidate other;
    other.value = __shfl_xor_sync(kFullMask, mine.value, offset);
    other.index = __shfl_xor_sync(kFullMask, mine.index, offset);
    if (other.index >= 0 && (mine.index < 0 || ranks_before(other.value, other.index, mine.value, mine.index))) {
      mine = other;
    }
  }
  mine.value = __shfl_sync(kFullMask, mine.value, 0);
  mine.index = __shfl_sync(kFullMask, mine.index, 0);
  return mine;
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    grouped_topk_kernel(const T* __restrict__ logits, const float* __restrict__ bias, float* __restrict__ weights,
                        int32_t* __restrict__ indices, int64_t tokens, int num_experts, int num_groups, int topk_group,
                        int topk, float routed_scaling_factor, bool renormalize) {
  extern __shared__ float shared[];
  const int lane = threadIdx.x % kWarpSize;
  const int warp_in_block = threadIdx.x / kWarpSize;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp_in_block;
  if (token >= tokens) return;  // the whole warp leaves together; nothing below synchronizes the block
  const int padded = padded_slot(num_experts);
  float* scores = shared + warp_in_block * 2 * padded;
  float* biased = scores + padded;

  const T* row = logits + token * num_experts;
  for (int e = lane; e < num_experts; e += kWarpSize) {
    const float score = router_sigmoid(to_float(row[e]));
    scores[padded_slot(e)] = score;
    biased[padded_slot(e)] = score + bias[e];
  }
  __syncwarp();

  const int group_size = num_experts / num_groups;
  float group_score = 0.0f;
  if (lane < num_groups) {
    const int first_expert = lane * group_size;
    const float a = biased[padded_slot(first_expert)], b = biased[padded_slot(first_expert + 1)];
    float first = a > b ? a : b, second = a > b ? b : a;
    for (int i = 2; i < group_size; ++i) {
      const float v = biased[padded_slot(first_expert + i)];
      if (v > first) {
        second = first;
        first = v;
      } else if (v > second) {
        second = v;
      }
    }
    group_score = first + second;
  }
  bool kept = false;
  for (int round = 0; round < topk_group; ++round) {
    const bool offered = lane < num_groups && !kept;
    const Candidate best = warp_best({group_score, offered ? lane : -1});
    if (lane == best.index) kept = true;
  }
  const unsigned kept_groups = __ballot_sync(kFullMask, kept);

  unsigned picked = 0;  // bit j: expert lane + 32 j is taken
  int my_expert = 0;
  float my_weight = 0.0f;
  for (int round = 0; round < topk; ++round) {
    Candidate mine{0.0f, -1};
    for (int j = 0, e = lane; e < num_experts; ++j, e += kWarpSize) {
      if ((picked >> j & 1u) || !(kept_groups >> (e / group_size) & 1u)) continue;
      const float v = biased[padded_slot(e)];
      if (mine.index < 0 || ranks_before(v, e, mine.value, mine.index)) mine = {v, e};
    }
    const Candidate best = warp_best(mine);
    // The kept groups hold at least topk experts, so best.index is a real, unpicked expert.
    if (lane == best.index % kWarpSize) picked |= 1u << (best.index / kWarpSize);
    if (lane == round) {
      my_expert = best.index;
      my_weight = scores[padded_slot(best.index)];
    }
  }
  // Every lane adds the weights in slot order, as the reference does.
  float total = __shfl_sync(kFullMask, my_weight, 0);
  for (int k = 1; k < topk; ++k) total = total + __shfl_sync(kFullMask, my_weight, k);
  if (lane < topk) {
    weights[token * topk + lane] = (renormalize ? my_weight / total : my_weight) * routed_scaling_factor;
    indices[token * topk + lane] = my_expert;
  }
}

}  // namespace

void grouped_topk(const GroupedTopkParams& params, std::uintptr_t stream_handle) {
  validate(params);
  if (params.tokens == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int experts = static_cast<int>(params.num_experts);
  const size_t shared_bytes = sizeof(float) * 2 * padded_slot(experts) * kWarpsPerBlock;
  const int64_t blocks = (params.tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  DSV3_CHECK(blocks <= 0x7FFFFFFF, "router_logits: too many tokens (", params.tokens, ")");
  dispatch_float_type(params.logits_dtype, [&](auto type) {
    using T = decltype(type);
    grouped_topk_kernel<T><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, shared_bytes, stream>>>(
        static_cast<const T*>(params.logits), params.bias, params.weights, params.indices, params.tokens, experts,
        static_cast<int>(params.num_groups), static_cast<int>(params.topk_group), static_cast<int>(params.topk),
        params.routed_scaling_factor, params.renormalize);
  });
  DSV3_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv3::cuda
