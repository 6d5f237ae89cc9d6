// FP8 GEMM variants for prefill-sized M: the hand-written 128 x 128 kernel whose scale promotion overlaps the next K
// block's MMAs (fp8_gemm_overlap_kernel.cuh), alone or in 1x2 clusters sharing tiles of a by multicast.
// Data-parallel over a persistent grid; no workspace.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <mutex>

#include "cuda/cuda_check.h"
#include "cuda/gemm/fp8_gemm_overlap_kernel.cuh"
#include "cuda/gemm/fp8_gemm_variants.h"
#include "cuda/tensor_map.h"

namespace dsv3::cuda {
namespace {

namespace kernel = fp8_gemm_overlap;

// Clusters of kCluster CTAs that fit on the GPU at once (a cluster's CTAs share a GPC), within num_sms SMs: the
// persistent grid. Queried once per process (one kind of GPU).
template <int kCluster>
int resident_clusters(int num_sms, cudaLaunchConfig_t config) {
  if (kCluster == 1) return num_sms;
  static int clusters = 0;
  static std::once_flag once;
  std::call_once(once, [&] {
    config.gridDim = dim3(kCluster * std::max(num_sms / kCluster, 1));
    DSV3_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, &kernel::fp8_gemm_overlap_kernel<kCluster>, &config));
  });
  return std::max(std::min(clusters, num_sms / kCluster), 1);
}

template <int kCluster>
void run_overlap(const Fp8GemmParams& p, int num_sms, cudaStream_t stream) {
  const int64_t m_tiles = (p.m + kernel::kTile - 1) / kernel::kTile,
                n_tiles = (p.n + kernel::kTile - 1) / kernel::kTile;
  const int64_t n_units = (n_tiles + kCluster - 1) / kCluster;
  DSV3_CHECK(m_tiles * n_units * kCluster <= INT32_MAX, "a/b: more output tiles than the kernel's grid loop counts");
  const kernel::Arguments args{p.a_scales,
                               p.b_scales,
                               p.out,
                               static_cast<int>(p.m),
                               static_cast<int>(p.n),
                               static_cast<int>(scale_blocks(p.k)),
                               static_cast<int>(m_tiles),
                               static_cast<int>(n_tiles),
                               static_cast<int>(n_units)};
  const CUtensorMap a_map = swizzled_rows_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, p.a, p.k, p.m, p.k, kernel::kTile,
                                              kernel::kTile / kCluster, "the FP8 GEMM's a");
  const CUtensorMap b_map = swizzled_rows_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, p.b, p.k, p.n, p.k, kernel::kTile,
                                              kernel::kTile, "the FP8 GEMM's b");
  auto* function = &kernel::fp8_gemm_overlap_kernel<kCluster>;
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
  const int64_t clusters = std::min<int64_t>(m_tiles * n_units, resident_clusters<kCluster>(num_sms, config));
  config.gridDim = dim3(static_cast<unsigned>(clusters * kCluster));
  DSV3_CUDA_CHECK(cudaLaunchKernelEx(&config, function, a_map, b_map, args));
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
  run_overlap<1>(params, num_sms, stream);
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
  run_overlap<2>(params, num_sms, stream);
}

}  // namespace dsv3::cuda
