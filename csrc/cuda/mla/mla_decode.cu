// Launcher of the sm_90a MLA decode: tensor maps for q and the bf16 cache, the decode kernel for the query-tile
// width that fits s_q * heads, then the combine step. No host synchronization: everything is enqueued on `stream`.
// DSV3_MLA_KERNEL=rows runs 64-row tiles over the bf16 cache with the query rows on the MMAs' M side
// (mla_decode_rows_kernel.cuh) instead of the page; it stays opt-in until a GPU run has timed it against the default.

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/mla/mla_decode_kernel.cuh"
#include "cuda/mla/mla_decode_rows_kernel.cuh"
#include "cuda/tensor_map.h"

namespace dsv3::cuda {
namespace {

// Row-major bf16 [rows, 576] (row stride 1152 bytes) read in boxes of 64 columns x box_rows rows, 128B-swizzled.
CUtensorMap bf16_rows_map(const void* base, uint64_t rows, uint32_t box_rows) {
  return swizzled_rows_map(CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, base, kMlaHeadDim, rows, kMlaHeadDim * 2, 64, box_rows,
                           "an MLA operand");
}

template <int N, bool kFp8>
void launch_decode(const CUtensorMap& q_map, const CUtensorMap& cache_map, const MlaDecodeParams& p, int tiles,
                   cudaStream_t stream) {
  constexpr int kBytes = mla::DecodeLayout<N, kFp8>::kBytes;
  auto* kernel = &mla::mla_decode_kernel<N, kFp8>;
  DSV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes));
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  const dim3 grid(static_cast<unsigned>(p.num_parts), static_cast<unsigned>(tiles));
  kernel<<<grid, mla::kThreads, kBytes, stream>>>(q_map, cache_map, p, scale_log2);
  DSV3_CUDA_CHECK(cudaGetLastError());
}

void launch_rows_decode(const CUtensorMap& q_map, const CUtensorMap& cache_map, const MlaDecodeParams& p, int tiles,
                        cudaStream_t stream) {
  constexpr int kBytes = mla::RowsLayout::kBytes;
  auto* kernel = &mla::mla_decode_rows_kernel;
  DSV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes));
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  const dim3 grid(static_cast<unsigned>(p.num_parts), static_cast<unsigned>(tiles));
  kernel<<<grid, mla::kThreads, kBytes, stream>>>(q_map, cache_map, p, scale_log2);
  DSV3_CUDA_CHECK(cudaGetLastError());
}

bool rows_kernel_requested() {
  const char* value = std::getenv("DSV3_MLA_KERNEL");
  if (value == nullptr || *value == '\0') return false;
  DSV3_CHECK(std::strcmp(value, "rows") == 0, "DSV3_MLA_KERNEL: expected rows (or unset), got '", value, "'");
  return true;
}

template <bool kFp8>
void launch_decode_for_rows(int64_t rows, bool rows_kernel, const CUtensorMap& q_map, const CUtensorMap& cache_map,
                            const MlaDecodeParams& p, cudaStream_t stream) {
  if (rows <= 16) return launch_decode<16, kFp8>(q_map, cache_map, p, 1, stream);
  if (rows <= 32) return launch_decode<32, kFp8>(q_map, cache_map, p, 1, stream);
  const int tiles = static_cast<int>((rows + 63) / 64);
  if (!kFp8 && rows_kernel) return launch_rows_decode(q_map, cache_map, p, tiles, stream);
  launch_decode<64, kFp8>(q_map, cache_map, p, tiles, stream);
}

int query_tile_rows(int64_t rows) { return rows <= 16 ? 16 : (rows <= 32 ? 32 : 64); }

}  // namespace

void mla_decode(const MlaDecodeParams& params, std::uintptr_t stream_handle) {
  validate(params);
  DSV3_CHECK(params.s_q * params.heads <= 65535, "q: s_q * heads = ", params.s_q * params.heads,
             " query rows a sequence is more than the kernels' grids take");
  DSV3_CHECK(params.num_parts <= 0x7FFFFFFF, "tile_scheduler_metadata: too many parts");
  DSV3_CHECK(params.num_blocks * kMlaPageSize < (int64_t{1} << 31), "kv_cache: more than 2^31 rows");
  DSV3_CHECK(params.batch * params.s_q * params.heads < (int64_t{1} << 31), "q: more than 2^31 query rows");
  DSV3_CHECK((reinterpret_cast<std::uintptr_t>(params.q) | reinterpret_cast<std::uintptr_t>(params.kv_cache)) % 16 == 0,
             "q/kv_cache: expected 16-byte aligned device pointers");
  const bool rows_kernel = rows_kernel_requested();  // checked before anything is enqueued
  if (params.batch == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t rows = params.s_q * params.heads;
  const int64_t workspace_rows = mla_max_splits(params.batch, params.num_parts);
  // Splits that are never written (a schedule that skips them) must read as NaN in the combine, not as stale data.
  DSV3_CUDA_CHECK(
      cudaMemsetAsync(params.partial_lse, 0xFF, static_cast<size_t>(workspace_rows * rows) * sizeof(float), stream));

  const CUtensorMap q_map =
      bf16_rows_map(params.q, static_cast<uint64_t>(params.batch * rows), static_cast<uint32_t>(query_tile_rows(rows)));
  // The FP8 kernel copies raw pages without a tensor map; an empty cache gets a map that is never used.
  const bool cache_map_used = !params.fp8_cache && params.num_blocks > 0;
  const CUtensorMap cache_map =
      cache_map_used ? bf16_rows_map(params.kv_cache, static_cast<uint64_t>(params.num_blocks) * 64, 64) : q_map;
  if (params.fp8_cache) {
    launch_decode_for_rows<true>(rows, rows_kernel, q_map, cache_map, params, stream);
  } else {
    launch_decode_for_rows<false>(rows, rows_kernel, q_map, cache_map, params, stream);
  }
  const dim3 grid(static_cast<unsigned>(params.batch), static_cast<unsigned>(rows));
  mla::mla_combine_kernel<<<grid, mla::kCombineThreads, 0, stream>>>(params);
  DSV3_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv3::cuda
