// FP8 GEMM variant for prefill-sized M: the hand-written 128 x 128 kernel whose scale promotion overlaps the next K
// block's MMAs (fp8_gemm_overlap_kernel.cuh). Data-parallel over a persistent grid; no workspace.

#include <cuda_runtime_api.h>

#include <algorithm>

#include "cuda/cuda_check.h"
#include "cuda/gemm/fp8_gemm_overlap_kernel.cuh"
#include "cuda/gemm/fp8_gemm_variants.h"
#include "cuda/tensor_map.h"

namespace dsv3::cuda {

template <>
int64_t Fp8GemmKernel<Fp8GemmVariant::kTile128x128Overlap>::workspace_bytes(int64_t, int64_t, int64_t,
                                                                            const Fp8GemmSchedule&, int) {
  return 0;
}

template <>
void Fp8GemmKernel<Fp8GemmVariant::kTile128x128Overlap>::run(const Fp8GemmParams& p, const Fp8GemmSchedule&, void*,
                                                             int num_sms, cudaStream_t stream) {
  namespace kernel = fp8_gemm_overlap;
  const int64_t m_tiles = (p.m + kernel::kTile - 1) / kernel::kTile,
                n_tiles = (p.n + kernel::kTile - 1) / kernel::kTile;
  DSV3_CHECK(m_tiles * n_tiles <= INT32_MAX, "a/b: more output tiles than the kernel's grid loop counts");
  const kernel::Arguments args{p.a_scales,
                               p.b_scales,
                               p.out,
                               static_cast<int>(p.m),
                               static_cast<int>(p.n),
                               static_cast<int>(scale_blocks(p.k)),
                               static_cast<int>(m_tiles),
                               static_cast<int>(n_tiles)};
  const CUtensorMap a_map = swizzled_rows_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, p.a, p.k, p.m, p.k, kernel::kTile,
                                              kernel::kTile, "the FP8 GEMM's a");
  const CUtensorMap b_map = swizzled_rows_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, p.b, p.k, p.n, p.k, kernel::kTile,
                                              kernel::kTile, "the FP8 GEMM's b");
  auto* function = &kernel::fp8_gemm_overlap_kernel;
  DSV3_CUDA_CHECK(cudaFuncSetAttribute(function, cudaFuncAttributeMaxDynamicSharedMemorySize, kernel::kSharedBytes));
  const auto grid = static_cast<unsigned>(std::min<int64_t>(m_tiles * n_tiles, num_sms));
  function<<<grid, kernel::kThreads, kernel::kSharedBytes, stream>>>(a_map, b_map, args);
  DSV3_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv3::cuda
