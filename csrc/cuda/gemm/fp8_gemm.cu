// FP8 block-scaled GEMM for sm_90a: picks the variant and decomposition (dsv3/gemm_schedule.h) and launches it.

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <optional>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/gemm/fp8_gemm_variants.h"

namespace dsv3::cuda {

std::optional<Fp8GemmVariant> requested_fp8_gemm_variant() {
  const char* value = std::getenv("DSV3_FP8_GEMM_KERNEL");
  if (value == nullptr || *value == '\0') return std::nullopt;
  if (std::strcmp(value, "overlap") == 0) return Fp8GemmVariant::kTile128x128Overlap;
  if (std::strcmp(value, "overlap_cluster") == 0) return Fp8GemmVariant::kTile128x128OverlapCluster1x2;
  if (std::strcmp(value, "decode") == 0) return Fp8GemmVariant::kDecode128x64;
  DSV3_CHECK(false, "DSV3_FP8_GEMM_KERNEL: expected overlap, overlap_cluster or decode (or unset), got '", value, "'");
  return std::nullopt;
}

namespace {

Fp8GemmSchedule schedule_for(int64_t m, int64_t n, int64_t k, int num_sms,
                             const std::optional<Fp8GemmSchedule>& forced) {
  if (!forced) {
    if (const std::optional<Fp8GemmVariant> variant = requested_fp8_gemm_variant()) {
      if (*variant == Fp8GemmVariant::kDecode128x64) {
        if (m > kDecodeMaxTokens) return choose_fp8_gemm_schedule(m, n, k, num_sms);
        const int64_t tiles = (m + 63) / 64 * ((n + 127) / 128);
        const int32_t splits = decode_splits(tiles, k, num_sms);
        return {*variant, splits > 1 ? Fp8GemmDecomposition::kSplitK : Fp8GemmDecomposition::kDataParallel, splits,
                tiles};
      }
      return {*variant, Fp8GemmDecomposition::kDataParallel, 1, (m + 127) / 128 * ((n + 127) / 128)};
    }
    return choose_fp8_gemm_schedule(m, n, k, num_sms);
  }
  const Fp8GemmSchedule& s = *forced;
  const auto variant = static_cast<int32_t>(s.variant), decomposition = static_cast<int32_t>(s.decomposition);
  DSV3_CHECK(variant >= 0 && variant <= 6,
             "schedule: variant must be 0 (128x128), 1 (swap-AB 128x64), 2 (ping-pong 64x128), 3 (128x128 in 1x2 "
             "clusters), 4 (hand-written 128x128, overlapped promotion), 5 (4 in 1x2 clusters) or 6 (hand-written "
             "decode, K split in clusters), got ",
             variant);
  DSV3_CHECK(decomposition >= 0 && decomposition <= 2,
             "schedule: decomposition must be 0 (data-parallel), 1 (split-K) or 2 (stream-K), got ", decomposition);
  DSV3_CHECK((variant < 4 && s.variant != Fp8GemmVariant::kPingpong64x128) ||
                 s.decomposition == Fp8GemmDecomposition::kDataParallel ||
                 (s.variant == Fp8GemmVariant::kDecode128x64 && s.decomposition == Fp8GemmDecomposition::kSplitK),
             "schedule: the ping-pong and overlap variants run data-parallel only (decomposition 0), the decode "
             "variant data-parallel or split-K (1), got ",
             decomposition);
  DSV3_CHECK(s.variant != Fp8GemmVariant::kDecode128x64 || s.splits <= kDecodeMaxSplits,
             "schedule: the decode variant splits K over at most ", kDecodeMaxSplits, " CTAs (a cluster), got ",
             s.splits);
  DSV3_CHECK(s.splits == 1 ||
                 (s.decomposition == Fp8GemmDecomposition::kSplitK && s.splits >= 2 && s.splits <= (k + 127) / 128),
             "schedule: splits must be 1, or 2..K/128 with split-K, got ", s.splits);
  return s;
}

}  // namespace

int64_t fp8_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, int num_sms,
                                 const std::optional<Fp8GemmSchedule>& forced) {
  if (m == 0 || n == 0 || k == 0) return 0;
  const Fp8GemmSchedule schedule = schedule_for(m, n, k, num_sms, forced);
  switch (schedule.variant) {
    case Fp8GemmVariant::kSwapAB128x64:
      return Fp8GemmKernel<Fp8GemmVariant::kSwapAB128x64>::workspace_bytes(m, n, k, schedule, num_sms);
    case Fp8GemmVariant::kPingpong64x128:
      return Fp8GemmKernel<Fp8GemmVariant::kPingpong64x128>::workspace_bytes(m, n, k, schedule, num_sms);
    case Fp8GemmVariant::kTile128x128Cluster1x2:
      return Fp8GemmKernel<Fp8GemmVariant::kTile128x128Cluster1x2>::workspace_bytes(m, n, k, schedule, num_sms);
    case Fp8GemmVariant::kTile128x128Overlap:
      return Fp8GemmKernel<Fp8GemmVariant::kTile128x128Overlap>::workspace_bytes(m, n, k, schedule, num_sms);
    case Fp8GemmVariant::kTile128x128OverlapCluster1x2:
      return Fp8GemmKernel<Fp8GemmVariant::kTile128x128OverlapCluster1x2>::workspace_bytes(m, n, k, schedule, num_sms);
    case Fp8GemmVariant::kDecode128x64:
      return 0;  // K splits are reduced in shared memory
    default:
      return Fp8GemmKernel<Fp8GemmVariant::kTile128x128>::workspace_bytes(m, n, k, schedule, num_sms);
  }
}

void fp8_gemm_nt(const Fp8GemmParams& params, std::uintptr_t workspace, int num_sms, std::uintptr_t stream_handle,
                 const std::optional<Fp8GemmSchedule>& forced, bool overlap_predecessor) {
  validate(params);
  DSV3_CHECK(params.k % 16 == 0 && params.n % 8 == 0,
             "a/b: the CUDA kernel needs K % 16 == 0 and N % 8 == 0, got K=", params.k, " N=", params.n);
  DSV3_CHECK(params.m <= INT32_MAX && params.n <= INT32_MAX && params.k <= INT32_MAX, "a/b: dimensions beyond 2^31");
  DSV3_CHECK(num_sms > 0, "num_sms: expected a positive SM count, got ", num_sms);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (params.m == 0 || params.n == 0) return;
  if (params.k == 0) {  // empty sum
    DSV3_CUDA_CHECK(cudaMemsetAsync(params.out, 0, params.m * params.n * sizeof(uint16_t), stream));
    return;
  }
  const Fp8GemmSchedule schedule = schedule_for(params.m, params.n, params.k, num_sms, forced);
  DSV3_CHECK(workspace != 0 || fp8_gemm_workspace_bytes(params.m, params.n, params.k, num_sms, forced) == 0,
             "workspace: the split-K schedule needs a workspace");
  void* workspace_ptr = reinterpret_cast<void*>(workspace);
  switch (schedule.variant) {
    case Fp8GemmVariant::kSwapAB128x64:
      Fp8GemmKernel<Fp8GemmVariant::kSwapAB128x64>::run(params, schedule, workspace_ptr, num_sms, stream);
      break;
    case Fp8GemmVariant::kPingpong64x128:
      Fp8GemmKernel<Fp8GemmVariant::kPingpong64x128>::run(params, schedule, workspace_ptr, num_sms, stream);
      break;
    case Fp8GemmVariant::kTile128x128Cluster1x2:
      Fp8GemmKernel<Fp8GemmVariant::kTile128x128Cluster1x2>::run(params, schedule, workspace_ptr, num_sms, stream);
      break;
    case Fp8GemmVariant::kTile128x128Overlap:
      Fp8GemmKernel<Fp8GemmVariant::kTile128x128Overlap>::run(params, schedule, workspace_ptr, num_sms, stream);
      break;
    case Fp8GemmVariant::kTile128x128OverlapCluster1x2:
      Fp8GemmKernel<Fp8GemmVariant::kTile128x128OverlapCluster1x2>::run(params, schedule, workspace_ptr, num_sms,
                                                                        stream);
      break;
    case Fp8GemmVariant::kDecode128x64:
      fp8_gemm_decode_run(params, schedule.splits, overlap_predecessor, stream);
      break;
    default:
      Fp8GemmKernel<Fp8GemmVariant::kTile128x128>::run(params, schedule, workspace_ptr, num_sms, stream);
  }
}

}  // namespace dsv3::cuda
