#pragma once
// CUTLASS SM90 grouped (pointer-array) FP8 GEMM with block-scaled operands, for MoE experts: the same mainloop as
// fp8_gemm_cutlass.cuh (TMA, FP8 wgmma, per-128-K promotion with the scales, cooperative warp specialization) over a
// persistent tile scheduler that walks the tiles of every group. Per-group problem sizes and pointers are built on
// the device by setup kernels (from m_indices or masked_m, cuda/gemm/group_rows.cuh), so a call never synchronizes with
// the host and can be captured in a CUDA graph. Include only from instantiations/*.cu.

#include <cuda_runtime_api.h>

#include <cutlass/cutlass.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <algorithm>
#include <cstdint>
#include <cute/tensor.hpp>
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/gemm/fp8_gemm_cutlass.cuh"
#include "cuda/gemm/group_rows.cuh"
#include "dsv3/grouped_gemm_params.h"

namespace dsv3::cuda {

struct CutlassGroupedFp8Gemm {
  using ElementAB = cutlass::float_e4m3_t;
  using ElementD = cutlass::bfloat16_t;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::RowMajor;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M_g, N, K) a group
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using ScaleConfig =
      cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::K, cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, 8, ElementD, LayoutD*, 8,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, cute::tuple<LayoutA*, LayoutSFA*>, 16, ElementAB,
      cute::tuple<LayoutB*, LayoutSFB*>, 16, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;

  using Arguments = typename Gemm::Arguments;

  // Per-group argument arrays, carved out of the caller's workspace (each 128-byte aligned), followed by CUTLASS's
  // own workspace.
  struct GroupArrays {
    GroupRows group_rows;  // the rows of a each group computes (its M)
    typename ProblemShape::UnderlyingProblemShape* problems;
    const ElementAB** a;
    StrideA* stride_a;
    const ElementAB** b;
    StrideB* stride_b;
    const float** sfa;
    LayoutSFA* layout_sfa;
    const float** sfb;
    LayoutSFB* layout_sfb;
    ElementD** d;
    StrideD* stride_d;
    void* cutlass_workspace;
  };

  static constexpr int64_t align(int64_t bytes) { return (bytes + 127) / 128 * 128; }

  template <typename T>
  static T* take(std::uintptr_t& cursor, int64_t count) {
    T* here = reinterpret_cast<T*>(cursor);
    cursor += align(count * static_cast<int64_t>(sizeof(T)));
    return here;
  }

  // Addresses only, nothing is dereferenced: carve(0, groups) gives the arrays' total size.
  static GroupArrays carve(std::uintptr_t workspace, int64_t groups) {
    std::uintptr_t cursor = workspace;
    GroupArrays g;
    g.group_rows.first_row = take<int32_t>(cursor, groups);
    g.group_rows.last_row = take<int32_t>(cursor, groups);
    g.group_rows.rows = take<int32_t>(cursor, groups);
    g.problems = take<typename ProblemShape::UnderlyingProblemShape>(cursor, groups);
    g.a = take<const ElementAB*>(cursor, groups);
    g.stride_a = take<StrideA>(cursor, groups);
    g.b = take<const ElementAB*>(cursor, groups);
    g.stride_b = take<StrideB>(cursor, groups);
    g.sfa = take<const float*>(cursor, groups);
    g.layout_sfa = take<LayoutSFA>(cursor, groups);
    g.sfb = take<const float*>(cursor, groups);
    g.layout_sfb = take<LayoutSFB>(cursor, groups);
    g.d = take<ElementD*>(cursor, groups);
    g.stride_d = take<StrideD>(cursor, groups);
    g.cutlass_workspace = reinterpret_cast<void*>(cursor);
    return g;
  }

  static cutlass::KernelHardwareInfo hardware(int num_sms) {
    cutlass::KernelHardwareInfo info;
    DSV3_CUDA_CHECK(cudaGetDevice(&info.device_id));
    info.sm_count = num_sms;
    info.max_active_clusters = num_sms;
    return info;
  }

  static Arguments arguments(const GroupArrays& g, int64_t groups, int num_sms) {
    Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                   {static_cast<int>(groups), g.problems, nullptr},  // no host copy of the sizes: no sync
                   {g.a, g.stride_a, g.b, g.stride_b, g.sfa, g.layout_sfa, g.sfb, g.layout_sfb},
                   {{}, nullptr, g.stride_d, g.d, g.stride_d},
                   hardware(num_sms)};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    return args;
  }

  static int64_t workspace_bytes(int64_t groups, int num_sms) {
    const GroupArrays sizes = carve(0, groups);
    const auto arrays = static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(sizes.cutlass_workspace));
    return arrays + static_cast<int64_t>(Gemm::get_workspace_size(arguments(sizes, groups, num_sms)));
  }
};

namespace grouped_gemm_detail {

using Traits = CutlassGroupedFp8Gemm;

// One thread a group: its problem size and operand pointers (a group that computes no rows gets M = 0).
__global__ void build_group_arguments(GroupedFp8GemmParams p, Traits::GroupArrays g) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (group >= p.groups) return;
  int64_t first, rows;
  resolve_group_rows(p, g.group_rows, group, first, rows);
  const int64_t k_blocks = (p.k + 127) / 128, n_blocks = (p.n + 127) / 128;
  const auto rows_i = static_cast<int>(rows), n = static_cast<int>(p.n), k = static_cast<int>(p.k);
  g.problems[group] = {rows_i, n, k};
  g.a[group] = reinterpret_cast<const Traits::ElementAB*>(p.a + first * p.k);
  g.stride_a[group] = packed_stride<Traits::StrideA>(rows, p.k);
  g.b[group] = reinterpret_cast<const Traits::ElementAB*>(p.b + group * p.n * p.k);
  g.stride_b[group] = packed_stride<Traits::StrideB>(p.n, p.k);
  g.sfa[group] = p.a_scales + first * k_blocks;
  g.layout_sfa[group] = Traits::ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(rows_i, n, k, 1));
  g.sfb[group] = p.b_scales + group * n_blocks * k_blocks;
  g.layout_sfb[group] = Traits::ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(rows_i, n, k, 1));
  g.d[group] = reinterpret_cast<Traits::ElementD*>(p.out + first * p.n);
  g.stride_d[group] = packed_stride<Traits::StrideD>(rows, p.n);
}

}  // namespace grouped_gemm_detail

inline void run_grouped_fp8_gemm(const GroupedFp8GemmParams& p, void* workspace, int num_sms, cudaStream_t stream) {
  using namespace grouped_gemm_detail;
  const Traits::GroupArrays arrays = Traits::carve(reinterpret_cast<std::uintptr_t>(workspace), p.groups);
  const unsigned group_blocks = static_cast<unsigned>((p.groups + 127) / 128);
  if (p.layout == GroupedLayout::kContiguous) {
    find_contiguous_group_rows(p, arrays.group_rows, num_sms, stream);
  }
  build_group_arguments<<<group_blocks, 128, 0, stream>>>(p, arrays);
  DSV3_CUDA_CHECK(cudaGetLastError());

  const Traits::Arguments args = Traits::arguments(arrays, p.groups, num_sms);
  Traits::Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status == cutlass::Status::kSuccess) status = gemm.initialize(args, arrays.cutlass_workspace, stream);
  if (status == cutlass::Status::kSuccess) status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string("grouped fp8 gemm: CUTLASS failed: ") + cutlassGetStatusString(status));
  }
  if (p.layout == GroupedLayout::kContiguous) zero_uncomputed_rows(p, arrays.group_rows.rows, stream);
}

}  // namespace dsv3::cuda
