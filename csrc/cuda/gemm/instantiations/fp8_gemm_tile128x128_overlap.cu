// FP8 GEMM variants on the hand-written 128 x 128 kernel whose scale promotion overlaps the next K block's MMAs
// (fp8_gemm_overlap_kernel.cuh), alone or in 1x2 clusters sharing tiles of a by multicast: dense, and grouped (MoE
// experts, contiguous or masked layout) with the tiles of every group listed on the device. Data-parallel over a
// persistent grid.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <mutex>

#include "cuda/cuda_check.h"
#include "cuda/gemm/fp8_gemm_overlap_kernel.cuh"
#include "cuda/gemm/fp8_gemm_variants.h"
#include "cuda/gemm/group_rows.cuh"
#include "cuda/gemm/grouped_fp8_gemm.h"
#include "cuda/tensor_map.h"

namespace dsv3::cuda {
namespace {

namespace kernel = fp8_gemm_overlap;

// Clusters of kCluster CTAs that fit on the GPU at once (a cluster's CTAs share a GPC), within num_sms SMs: the
// persistent grid. Queried once per process (one kind of GPU).
template <int kCluster, bool kGrouped>
int resident_clusters(int num_sms, cudaLaunchConfig_t config) {
  if (kCluster == 1) return num_sms;
  static int clusters = 0;
  static std::once_flag once;
  std::call_once(once, [&] {
    config.gridDim = dim3(kCluster * std::max(num_sms / kCluster, 1));
    DSV3_CUDA_CHECK(
        cudaOccupancyMaxActiveClusters(&clusters, &kernel::fp8_gemm_overlap_kernel<kCluster, kGrouped>, &config));
  });
  return std::max(std::min(clusters, num_sms / kCluster), 1);
}

// a [a_rows, k] and b [b_rows, k] e4m3; units_bound: at least the units the kernel will find (the grid's size).
template <int kCluster, bool kGrouped>
void launch(const kernel::Arguments& args, const uint8_t* a, int64_t a_rows, const uint8_t* b, int64_t b_rows,
            int64_t k, int64_t units_bound, int num_sms, cudaStream_t stream) {
  const CUtensorMap a_map = swizzled_rows_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, a, k, a_rows, k, kernel::kTile,
                                              kernel::kTile / kCluster, "the FP8 GEMM's a");
  const CUtensorMap b_map = swizzled_rows_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, b, k, b_rows, k, kernel::kTile,
                                              kernel::kTile, "the FP8 GEMM's b");
  auto* function = &kernel::fp8_gemm_overlap_kernel<kCluster, kGrouped>;
  DSV3_CUDA_CHECK(cudaFuncSetAttribute(function, cudaFuncAttributeMaxDynamicSharedMemorySize, kernel::kSharedBytes));
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = kCluster;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.blockDim = dim3(kernel::kThreads);
  config.dynamicSmemBytes = kernel::kSharedBytes;
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  const int64_t clusters = std::min<int64_t>(units_bound, resident_clusters<kCluster, kGrouped>(num_sms, config));
  // the unit loop steps past the last unit by up to one grid's clusters: no int32 overflow on the way
  DSV3_CHECK(units_bound + clusters <= INT32_MAX, "a/b: more output tiles than the kernel's loop counts");
  config.gridDim = dim3(static_cast<unsigned>(clusters * kCluster));
  DSV3_CUDA_CHECK(cudaLaunchKernelEx(&config, function, a_map, b_map, args));
}

kernel::Arguments shape_arguments(const float* a_scales, const float* b_scales, uint16_t* out, int64_t m, int64_t n,
                                  int64_t k, int cluster) {
  const int64_t n_tiles = (n + kernel::kTile - 1) / kernel::kTile;
  kernel::Arguments args{};
  args.a_scales = a_scales;
  args.b_scales = b_scales;
  args.out = out;
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k_blocks = static_cast<int>(scale_blocks(k));
  args.n_tiles = static_cast<int>(n_tiles);
  args.n_units = static_cast<int>((n_tiles + cluster - 1) / cluster);
  return args;
}

template <int kCluster>
void run_dense(const Fp8GemmParams& p, int num_sms, cudaStream_t stream) {
  kernel::Arguments args = shape_arguments(p.a_scales, p.b_scales, p.out, p.m, p.n, p.k, kCluster);
  const int64_t m_tiles = (p.m + kernel::kTile - 1) / kernel::kTile;
  args.m_tiles = static_cast<int>(m_tiles);
  launch<kCluster, false>(args, p.a, p.m, p.b, p.n, p.k, m_tiles * args.n_units, num_sms, stream);
}

// One block: each group's first row and rows (group_rows.cuh), and the exclusive prefix sum of its 128-row tiles
// into group_tiles[0 .. groups], chunk by chunk of the block's threads.
__global__ void list_group_tiles(GroupedFp8GemmParams p, GroupRows g, int32_t* group_tiles) {
  __shared__ int32_t warp_totals[32];
  __shared__ int32_t carry;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < p.groups; base += blockDim.x) {
    const int64_t group = base + threadIdx.x;
    int32_t tiles = 0;
    if (group < p.groups) {
      int64_t first, rows;
      resolve_group_rows(p, g, group, first, rows);
      g.first_row[group] = static_cast<int32_t>(first);
      tiles = static_cast<int32_t>((rows + kernel::kTile - 1) / kernel::kTile);
    }
    int32_t inclusive = tiles;  // within the warp
    for (int offset = 1; offset < 32; offset *= 2) {
      const int32_t other = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    int32_t before = carry;
    for (int w = 0; w < warp; ++w) before += warp_totals[w];
    if (group < p.groups) group_tiles[group] = before + inclusive - tiles;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 0; w < warps; ++w) carry += warp_totals[w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) group_tiles[p.groups] = carry;
}

// Workspace: the group rows (first, last, count) and group_tiles, each 128-byte aligned.
constexpr int64_t aligned(int64_t bytes) { return (bytes + 127) / 128 * 128; }

template <int kCluster>
void run_grouped(const GroupedFp8GemmParams& p, void* workspace, int num_sms, cudaStream_t stream) {
  auto* base = static_cast<uint8_t*>(workspace);
  const int64_t array_bytes = aligned(4 * (p.groups + 1));
  GroupRows g{reinterpret_cast<int32_t*>(base), reinterpret_cast<int32_t*>(base + array_bytes),
              reinterpret_cast<int32_t*>(base + 2 * array_bytes)};
  auto* group_tiles = reinterpret_cast<int32_t*>(base + 3 * array_bytes);
  const int64_t a_rows = p.layout == GroupedLayout::kContiguous ? p.m : p.groups * p.m;
  kernel::Arguments args = shape_arguments(p.a_scales, p.b_scales, p.out, a_rows, p.n, p.k, kCluster);
  args.group_tiles = group_tiles;
  args.first_row = g.first_row;
  args.rows = g.rows;
  args.groups = static_cast<int>(p.groups);
  // tile rows: contiguous, at most one partial tile a group beyond the full ones; masked, every slab's
  const int64_t m_tiles_bound = p.layout == GroupedLayout::kContiguous
                                    ? a_rows / kernel::kTile + std::min<int64_t>(p.groups, a_rows)
                                    : p.groups * ((p.m + kernel::kTile - 1) / kernel::kTile);
  // before anything is enqueued (a graph being captured gets no partial call)
  DSV3_CHECK(a_rows <= INT32_MAX && m_tiles_bound * args.n_units + num_sms <= INT32_MAX,
             "a: more rows or output tiles than the kernel's loops count");

  if (p.layout == GroupedLayout::kContiguous) find_contiguous_group_rows(p, g, num_sms, stream);
  list_group_tiles<<<1, 1024, 0, stream>>>(p, g, group_tiles);
  DSV3_CUDA_CHECK(cudaGetLastError());
  if (m_tiles_bound > 0) {
    launch<kCluster, true>(args, p.a, a_rows, p.b, p.groups * p.n, p.k, m_tiles_bound * args.n_units, num_sms, stream);
  }
  if (p.layout == GroupedLayout::kContiguous) zero_uncomputed_rows(p, g.rows, stream);
}

}  // namespace

template <>
int64_t Fp8GemmKernel<Fp8GemmVariant::kTile128x128Overlap>::workspace_bytes(int64_t, int64_t, int64_t,
                                                                            const Fp8GemmSchedule&, int) {
  return 0;
}

template <>
void Fp8GemmKernel<Fp8GemmVariant::kTile128x128Overlap>::run(const Fp8GemmParams& params, const Fp8GemmSchedule&, void*,
                                                             int num_sms, cudaStream_t stream) {
  run_dense<1>(params, num_sms, stream);
}

template <>
int64_t Fp8GemmKernel<Fp8GemmVariant::kTile128x128OverlapCluster1x2>::workspace_bytes(int64_t, int64_t, int64_t,
                                                                                      const Fp8GemmSchedule&, int) {
  return 0;
}

template <>
void Fp8GemmKernel<Fp8GemmVariant::kTile128x128OverlapCluster1x2>::run(const Fp8GemmParams& params,
                                                                       const Fp8GemmSchedule&, void*, int num_sms,
                                                                       cudaStream_t stream) {
  run_dense<2>(params, num_sms, stream);
}

int64_t grouped_fp8_gemm_overlap_workspace_bytes(int64_t groups) { return 4 * aligned(4 * (groups + 1)); }

void grouped_fp8_gemm_overlap_run(const GroupedFp8GemmParams& params, bool cluster, void* workspace, int num_sms,
                                  cudaStream_t stream) {
  if (cluster) {
    run_grouped<2>(params, workspace, num_sms, stream);
  } else {
    run_grouped<1>(params, workspace, num_sms, stream);
  }
}

}  // namespace dsv3::cuda
