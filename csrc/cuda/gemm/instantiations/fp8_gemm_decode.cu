// FP8 GEMMs on the hand-written decode kernel (fp8_gemm_decode_kernel.cuh): dense (variant kDecode128x64; the
// schedule's splits are the cluster's size) and masked grouped (MoE decode, DSV3_FP8_GEMM_KERNEL=decode).

#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>

#include "cuda/cuda_check.h"
#include "cuda/gemm/fp8_gemm_decode_kernel.cuh"
#include "cuda/gemm/fp8_gemm_variants.h"
#include "cuda/gemm/grouped_fp8_gemm.h"
#include "cuda/tensor_map.h"

namespace dsv3::cuda {
namespace {

namespace kernel = fp8_gemm_decode;

// a [a_rows, k] and b [b_rows, k] e4m3; one cluster of `splits` CTAs per tile (n_tiles x token_tile_stride x groups).
template <bool kMasked>
void launch(const kernel::Arguments& args, const uint8_t* a, int64_t a_rows, const uint8_t* b, int64_t b_rows,
            int64_t k, int64_t tiles, int splits, bool overlap_predecessor, cudaStream_t stream) {
  DSV3_CHECK(splits >= 1 && splits <= kDecodeMaxSplits, "schedule: the decode kernel splits K over 1 to ",
             kDecodeMaxSplits, " CTAs, got ", splits);
  DSV3_CHECK(tiles * splits <= INT32_MAX, "a/b: more output tiles than one launch holds");
  // the token-tile loop steps past the last row by up to one stride
  DSV3_CHECK(a_rows + (args.token_tile_stride + 1) * int64_t{kernel::kTokens} <= INT32_MAX,
             "a: more rows than the kernel's row indices count");
  const CUtensorMap a_map = swizzled_rows_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, a, k, a_rows, k, kernel::kBlockK,
                                              kernel::kTokens, "the FP8 GEMM's a");
  const CUtensorMap b_map = swizzled_rows_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, b, k, b_rows, k, kernel::kBlockK,
                                              kernel::kWeightRows, "the FP8 GEMM's b");
  auto* function = &kernel::fp8_gemm_decode_kernel<kMasked>;
  DSV3_CUDA_CHECK(cudaFuncSetAttribute(function, cudaFuncAttributeMaxDynamicSharedMemorySize, kernel::kSharedBytes));
  // all of the SM's unified memory as shared memory, so that two CTAs fit
  DSV3_CUDA_CHECK(
      cudaFuncSetAttribute(function, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
  cudaLaunchAttribute attributes[2]{};
  attributes[0].id = cudaLaunchAttributeClusterDimension;
  attributes[0].val.clusterDim.x = static_cast<unsigned>(splits);
  attributes[0].val.clusterDim.y = 1;
  attributes[0].val.clusterDim.z = 1;
  // start while the kernel before it finishes; the kernel waits for it before reading anything it may write
  attributes[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(tiles * splits));
  config.blockDim = dim3(kernel::kThreads);
  config.dynamicSmemBytes = kernel::kSharedBytes;
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = overlap_predecessor ? 2 : 1;
  DSV3_CUDA_CHECK(cudaLaunchKernelEx(&config, function, a_map, b_map, args));
}

kernel::Arguments shape_arguments(const float* a_scales, const float* b_scales, uint16_t* out, int64_t m, int64_t n,
                                  int64_t k) {
  kernel::Arguments args{};
  args.a_scales = a_scales;
  args.b_scales = b_scales;
  args.out = out;
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k_blocks = static_cast<int>(scale_blocks(k));
  args.n_tiles = static_cast<int>((n + kernel::kWeightRows - 1) / kernel::kWeightRows);
  args.token_tile_stride = static_cast<int>((m + kernel::kTokens - 1) / kernel::kTokens);
  return args;
}

}  // namespace

void fp8_gemm_decode_run(const Fp8GemmParams& p, int splits, bool overlap_predecessor, cudaStream_t stream) {
  const kernel::Arguments args = shape_arguments(p.a_scales, p.b_scales, p.out, p.m, p.n, p.k);
  const int64_t tiles = static_cast<int64_t>(args.n_tiles) * args.token_tile_stride;
  launch<false>(args, p.a, p.m, p.b, p.n, p.k, tiles, splits, overlap_predecessor, stream);
}

void grouped_fp8_gemm_decode_run(const GroupedFp8GemmParams& p, int num_sms, cudaStream_t stream) {
  DSV3_CHECK(p.layout == GroupedLayout::kMasked, "the decode kernel runs the masked layout only");
  kernel::Arguments args = shape_arguments(p.a_scales, p.b_scales, p.out, p.m, p.n, p.k);
  args.masked_m = p.masked_m;
  // the tiles of expected_m tokens in every slab; a cluster whose first tile has no rows leaves at once, one whose
  // group has more rows takes them tile after tile
  args.token_tile_stride =
      static_cast<int>(std::max<int64_t>((expected_rows(p) + kernel::kTokens - 1) / kernel::kTokens, 1));
  const int64_t tiles = p.groups * args.token_tile_stride * args.n_tiles;
  launch<true>(args, p.a, p.groups * p.m, p.b, p.groups * p.n, p.k, tiles, decode_splits(tiles, p.k, num_sms), false,
               stream);
}

}  // namespace dsv3::cuda
