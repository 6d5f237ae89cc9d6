// Token permutation into an MoE layout and the weighted unpermutation, on the GPU. Bit-exact with the CPU kernels
// and dsv3.reference.moe: rows are copied as raw bytes, the fused quantization uses the rules of dsv3/fp8.h, and the
// weighted sum rounds every product and sum to fp32 in slot order (explicit __fmul_rn / __fadd_rn: no FMA).
// Indices outside their range (src_token outside [0, tokens), row_of outside [0, rows)) are treated as absent.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/element_types.cuh"
#include "cuda/quant/group_quant.cuh"
#include "dsv3/fp8.h"
#include "dsv3/moe_params.h"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 128;

// One CTA per output row; Vector is the widest unit (16, 8, 4 or 2 bytes) that divides a row.
template <typename Vector>
__global__ void __launch_bounds__(kThreads)
    permute_copy_kernel(const Vector* __restrict__ x, const int64_t* __restrict__ src_token, Vector* __restrict__ out,
                        int64_t tokens, int64_t vectors_per_row) {
  const int64_t row = blockIdx.x;
  const int64_t token = src_token[row];
  const bool valid = token >= 0 && token < tokens;
  const Vector* src = x + (valid ? token : 0) * vectors_per_row;
  Vector* dst = out + row * vectors_per_row;
  for (int64_t v = threadIdx.x; v < vectors_per_row; v += kThreads) dst[v] = valid ? src[v] : Vector{};
}

// One warp per output row. A 128-channel group is kLanes lanes x kVec elements (one 16-byte load per lane), so a
// warp quantizes 32 / kLanes groups per step; amax is reduced over the group's lanes only. The loads of kUnroll steps
// go out before the first reduction waits on them: with one step's load in flight a warp spent most of its time
// waiting, and the kernel moved ~1.2 TB/s.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    permute_quant_kernel(const T* __restrict__ x, const int64_t* __restrict__ src_token, uint8_t* __restrict__ q,
                         float* __restrict__ scales, int64_t tokens, int64_t rows, int hidden, bool ue8m0) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kLanes = kMoeQuantGroup / kVec;
  constexpr int kGroupsPerStep = kWarpSize / kLanes;
  constexpr int kUnroll = 4;
  using InVector = AlignedVector<T, kVec>;
  using OutVector = AlignedVector<uint8_t, kVec>;
  const int lane = threadIdx.x % kWarpSize, sub_lane = lane % kLanes;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarpSize) + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // the whole warp leaves together
  const int64_t token = src_token[row];
  const bool valid = token >= 0 && token < tokens;
  const int groups = hidden / static_cast<int>(kMoeQuantGroup);
  for (int first = 0; first < groups; first += kGroupsPerStep * kUnroll) {
    InVector in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int group = first + u * kGroupsPerStep + lane / kLanes;
      if (valid && group < groups) {
        in[u] = *reinterpret_cast<const InVector*>(x + token * hidden + group * kMoeQuantGroup + sub_lane * kVec);
      } else {  // a padding row quantizes zeros
#pragma unroll
        for (int i = 0; i < kVec; ++i) in[u].values[i] = from_float<T>(0.0f);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int group = first + u * kGroupsPerStep + lane / kLanes;
      OutVector out;
      const float scale = quantize_lane_vector<T, kVec, kLanes>(in[u], ue8m0, out);  // every lane, past the end or not
      if (group >= groups) continue;
      *reinterpret_cast<OutVector*>(q + row * hidden + group * kMoeQuantGroup + sub_lane * kVec) = out;
      if (sub_lane == 0) scales[row * groups + group] = scale;
    }
  }
}

// Grid (tokens, vector blocks): a thread owns kVec consecutive channels of one token and adds the token's slots in
// order, loading kSlots of them before the first sum waits (one CTA per token, looping over the channels with one
// load in flight, left a decode-sized batch latency-bound: 10% of HBM at 128 tokens).
constexpr int kSlots = 8;
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    unpermute_kernel(const T* __restrict__ y, const int64_t* __restrict__ row_of, const float* __restrict__ weights,
                     T* __restrict__ out, int topk, int64_t rows, int64_t hidden) {
  using Vector = AlignedVector<T, kVec>;
  const int64_t token = blockIdx.x;
  const int64_t v = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (v >= hidden / kVec) return;
  float acc[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = 0.0f;
  for (int first = 0; first < topk; first += kSlots) {
    Vector in[kSlots];
    float w[kSlots];
    bool present[kSlots];
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int k = first + j;
      const int64_t row = k < topk ? row_of[token * topk + k] : -1;
      present[j] = row >= 0 && row < rows;
      if (present[j]) {
        w[j] = weights[token * topk + k];
        in[j] = reinterpret_cast<const Vector*>(y + row * hidden)[v];
      }
    }
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      if (!present[j]) continue;
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w[j], to_float(in[j].values[i])));
    }
  }
  Vector result;
#pragma unroll
  for (int i = 0; i < kVec; ++i) result.values[i] = from_float<T>(acc[i]);
  reinterpret_cast<Vector*>(out + token * hidden)[v] = result;
}

template <typename Vector>
void launch_copy(const MoePermuteParams& p, int64_t row_bytes, cudaStream_t stream) {
  permute_copy_kernel<Vector><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(
      static_cast<const Vector*>(p.x), p.src_token, static_cast<Vector*>(p.out), p.tokens,
      row_bytes / static_cast<int64_t>(sizeof(Vector)));
}

}  // namespace

void moe_permute(const MoePermuteParams& params, std::uintptr_t stream_handle) {
  validate(params);
  if (params.rows * params.hidden == 0) return;
  DSV3_CHECK(params.rows <= 0x7FFFFFFF, "src_token: too many rows (", params.rows, ")");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (params.quantize) {
    DSV3_CHECK(params.hidden <= 0x7FFFFFFF, "x: hidden size too large");
    const int64_t blocks = (params.rows + kThreads / kWarpSize - 1) / (kThreads / kWarpSize);
    dispatch_float_type(params.x_dtype, [&](auto type) {
      using T = decltype(type);
      permute_quant_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          static_cast<const T*>(params.x), params.src_token, params.q, params.scales, params.tokens, params.rows,
          static_cast<int>(params.hidden), params.ue8m0);
    });
  } else {
    // dsv3.ops hands over 16-byte aligned bases, so each row starts aligned to the widest unit dividing its size.
    const int64_t row_bytes = params.hidden * dtype_size(params.x_dtype);
    if (row_bytes % 16 == 0) {
      launch_copy<uint4>(params, row_bytes, stream);
    } else if (row_bytes % 8 == 0) {
      launch_copy<uint2>(params, row_bytes, stream);
    } else if (row_bytes % 4 == 0) {
      launch_copy<uint32_t>(params, row_bytes, stream);
    } else {
      launch_copy<uint16_t>(params, row_bytes, stream);
    }
  }
  DSV3_CUDA_CHECK(cudaGetLastError());
}

void moe_unpermute(const MoeUnpermuteParams& params, std::uintptr_t stream_handle) {
  validate(params);
  if (params.tokens * params.hidden == 0) return;
  DSV3_CHECK(params.tokens <= 0x7FFFFFFF, "row_of: too many tokens (", params.tokens, ")");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  dispatch_float_type(params.dtype, [&](auto type) {
    using T = decltype(type);
    constexpr int kVec = 16 / sizeof(T);
    const auto* y = static_cast<const T*>(params.y);
    auto* out = static_cast<T*>(params.out);
    const int topk = static_cast<int>(params.topk);
    // 16-byte vectors need every row to start on a 16-byte boundary: hidden a multiple of kVec.
    const int vec = params.hidden % kVec == 0 ? kVec : 1;
    const int64_t vector_blocks = (params.hidden / vec + kThreads - 1) / kThreads;
    DSV3_CHECK(vector_blocks <= 65535, "y: hidden size ", params.hidden, " too large");
    const dim3 grid(static_cast<unsigned>(params.tokens), static_cast<unsigned>(vector_blocks));
    if (vec == kVec) {
      unpermute_kernel<T, kVec>
          <<<grid, kThreads, 0, stream>>>(y, params.row_of, params.weights, out, topk, params.rows, params.hidden);
    } else {
      unpermute_kernel<T, 1>
          <<<grid, kThreads, 0, stream>>>(y, params.row_of, params.weights, out, topk, params.rows, params.hidden);
    }
  });
  DSV3_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv3::cuda
