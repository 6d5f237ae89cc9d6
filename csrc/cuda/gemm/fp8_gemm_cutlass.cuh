#pragma once
// CUTLASS SM90 FP8 GEMM with block-scaled operands: TMA loads, FP8 wgmma, warp-specialized persistent schedule (one
// producer warp group, two consumer warp groups), partial sums promoted into fp32 registers with sa * sb after every
// 128-deep K block, bf16 epilogue through TMA stores. Include only from instantiations/*.cu.
//
// Cooperative: both consumer warp groups share one 128-row tile, under the stream-K scheduler (data-parallel, split-K
// or stream-K); with kClusterN = 2, CTAs run in pairs along N that receive each tile of A by one TMA multicast.
// Ping-pong: each consumer warp group owns a 64-row tile and the two alternate, so one promotes its partial sums and
// runs its epilogue while the other's MMAs run; CUTLASS runs it data-parallel only.
//
// The kernel computes D[M', N'] = A[M', K] B[N', K]^T with A and B K-major:
//   normal   A = a (tokens), SFA = a_scales, one per row           B = b (weight), SFB = b_scales, per 128 rows
//            D = out, row-major [m, n]
//   swap-AB  A = b (weight), SFA = b_scales, per 128 rows          B = a (tokens), SFB = a_scales, one per row
//            D = out^T, i.e. out row-major is D column-major [n, m]
// Scale tensors are K-major ([rows, ceil(K/128)] row-major), exactly as dsv3 stores them. Out-of-range rows of a
// tile (M, N not multiples of the tile) are zero-filled by TMA on load and clipped on store; scale loads are
// predicated, so nothing outside the operands is read or written.

#include <cuda_runtime_api.h>

#include <cutlass/cutlass.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cute/tensor.hpp>
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/kernel/tile_scheduler.hpp>

#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "dsv3/gemm_params.h"
#include "dsv3/gemm_schedule.h"

namespace dsv3::cuda {

// Stride of a packed rows x cols matrix (batch mode L = 1) for a CuTe stride type whose static-1 mode says which
// dimension is contiguous (grouped kernels' strides have a static batch mode, left as is).
template <class Stride>
CUTE_HOST_DEVICE Stride packed_stride(int64_t rows, int64_t cols) {
  Stride stride{};
  if constexpr (cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<1>(stride))>>) {
    cute::get<0>(stride) = cols;  // contiguous along the second dimension
  } else {
    cute::get<1>(stride) = rows;  // contiguous along the first dimension
  }
  if constexpr (!cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<2>(stride))>>) {
    cute::get<2>(stride) = rows * cols;
  }
  return stride;
}

template <int kTileN, bool kSwapAB, bool kPingpong = false, int kClusterN = 1>
struct CutlassFp8Gemm {
  using ElementAB = cutlass::float_e4m3_t;
  using ElementD = cutlass::bfloat16_t;
  using LayoutA = cutlass::layout::RowMajor;     // [M', K], K contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // [N', K] seen as K x N' column-major: K contiguous
  using LayoutD = cute::conditional_t<kSwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int kAlignmentAB = 16;  // elements per 16-byte access
  static constexpr int kAlignmentD = 8;

  using TileShape = cute::Shape<cute::Int<kPingpong ? 64 : 128>, cute::Int<kTileN>, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::Int<kClusterN>, cute::_1>;
  // granularity (rows of A per scale, rows of B per scale, K per scale)
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<kSwapAB ? 128 : 1, kSwapAB ? 1 : 128, 128,
                                                                cute::GMMA::Major::K, cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlignmentD, ElementD, LayoutD,
      kAlignmentD,
      cute::conditional_t<kPingpong, cutlass::epilogue::TmaWarpSpecialized,
                          cutlass::epilogue::TmaWarpSpecializedCooperative>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, cute::tuple<LayoutA, LayoutSFA>, kAlignmentAB,
      ElementAB, cute::tuple<LayoutB, LayoutSFB>, kAlignmentAB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cute::conditional_t<kPingpong, cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8Blockwise,
                          cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise>>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<
      cute::Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue,
      cute::conditional_t<kPingpong, cutlass::gemm::PersistentScheduler, cutlass::gemm::StreamKScheduler>>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Arguments = typename Gemm::Arguments;

  static typename Kernel::TileSchedulerArguments scheduler_arguments(const Fp8GemmSchedule& schedule) {
    typename Kernel::TileSchedulerArguments scheduler{};
    if constexpr (!kPingpong) {
      using Mode = cutlass::gemm::kernel::detail::DecompositionMode;
      scheduler.splits = schedule.splits;
      scheduler.decomposition_mode = schedule.decomposition == Fp8GemmDecomposition::kSplitK    ? Mode::SplitK
                                     : schedule.decomposition == Fp8GemmDecomposition::kStreamK ? Mode::StreamK
                                                                                                : Mode::DataParallel;
    }
    return scheduler;
  }

  static cutlass::KernelHardwareInfo hardware(int num_sms) {
    cutlass::KernelHardwareInfo info;
    DSV3_CUDA_CHECK(cudaGetDevice(&info.device_id));
    info.sm_count = num_sms;
    // 1x1 clusters: one CTA per SM (the pipeline fills shared memory). Larger clusters: 0 lets CUTLASS size the grid
    // from the SMs per GPC, where a cluster's CTAs must sit together.
    info.max_active_clusters = kClusterN == 1 ? num_sms : 0;
    return info;
  }

  static Arguments arguments(const Fp8GemmParams& p, const Fp8GemmSchedule& schedule, int num_sms) {
    const int rows = static_cast<int>(kSwapAB ? p.n : p.m);  // M'
    const int cols = static_cast<int>(kSwapAB ? p.m : p.n);  // N'
    const int k = static_cast<int>(p.k);
    const auto* a = reinterpret_cast<const ElementAB*>(kSwapAB ? p.b : p.a);
    const auto* b = reinterpret_cast<const ElementAB*>(kSwapAB ? p.a : p.b);
    const float* sfa = kSwapAB ? p.b_scales : p.a_scales;
    const float* sfb = kSwapAB ? p.a_scales : p.b_scales;
    const auto problem = cute::make_shape(rows, cols, k, 1);
    const auto stride_a = packed_stride<typename Kernel::StrideA>(rows, k);
    const auto stride_b = packed_stride<typename Kernel::StrideB>(cols, k);
    const auto stride_d = packed_stride<typename Kernel::StrideD>(rows, cols);
    Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                   problem,
                   {a, stride_a, b, stride_b, sfa, ScaleConfig::tile_atom_to_shape_SFA(problem), sfb,
                    ScaleConfig::tile_atom_to_shape_SFB(problem)},
                   {{}, nullptr, stride_d, reinterpret_cast<ElementD*>(p.out), stride_d},
                   hardware(num_sms),
                   scheduler_arguments(schedule)};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    return args;
  }

  static int64_t workspace_bytes(int64_t m, int64_t n, int64_t k, const Fp8GemmSchedule& schedule, int num_sms) {
    Fp8GemmParams shape_only{nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k};
    return static_cast<int64_t>(Gemm::get_workspace_size(arguments(shape_only, schedule, num_sms)));
  }

  static void run(const Fp8GemmParams& params, const Fp8GemmSchedule& schedule, void* workspace, int num_sms,
                  cudaStream_t stream) {
    const Arguments args = arguments(params, schedule, num_sms);
    Gemm gemm;
    cutlass::Status status = gemm.can_implement(args);
    if (status != cutlass::Status::kSuccess) {
      throw std::invalid_argument(std::string("fp8_gemm_nt: shape not supported by the sm90 kernel: ") +
                                  cutlassGetStatusString(status));
    }
    status = gemm.initialize(args, workspace, stream);
    if (status == cutlass::Status::kSuccess) status = gemm.run(stream);
    if (status != cutlass::Status::kSuccess) {
      throw std::runtime_error(std::string("fp8_gemm_nt: CUTLASS launch failed: ") + cutlassGetStatusString(status));
    }
    DSV3_CUDA_CHECK(cudaGetLastError());
  }
};

}  // namespace dsv3::cuda
