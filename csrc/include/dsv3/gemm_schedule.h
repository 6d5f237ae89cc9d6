#pragma once
// How the FP8 GEMM is run on a GPU: which compiled kernel variant and how the work is split across SMs. Host-only
// and free of CUDA so the choice is unit-tested on machines without a GPU (dsv3._C.fp8_gemm_schedule).

#include <algorithm>
#include <cstdint>

namespace dsv3 {

enum class Fp8GemmVariant : int32_t {
  // out tile 128 (tokens) x 128 (weight rows); one scale per token row, one per 128x128 weight tile
  kTile128x128 = 0,
  // decode: computes out^T = b @ a^T so the weight fills the 128-row side of the MMA and up to 64 tokens its
  // 64-wide side, instead of padding a handful of tokens to 128 rows
  kSwapAB128x64 = 1,
};

enum class Fp8GemmDecomposition : int32_t {
  kDataParallel = 0,  // one CTA per output tile (persistent over waves)
  kSplitK = 1,        // `splits` CTAs share each tile's K range; partial sums reduced through the workspace
  kStreamK = 2,       // K iterations of all tiles spread evenly over the SMs
};

struct Fp8GemmSchedule {
  Fp8GemmVariant variant;
  Fp8GemmDecomposition decomposition;
  int32_t splits;  // > 1 only for kSplitK
  int64_t tiles;   // output tiles of the chosen variant
};

constexpr int64_t kSwapABMaxTokens = 64;
constexpr int64_t kMinKBlocksPerSplit = 4;  // below 4 x 128 of K per split the reduction costs more than it saves

inline Fp8GemmSchedule choose_fp8_gemm_schedule(int64_t m, int64_t n, int64_t k, int num_sms) {
  const bool swap = m <= kSwapABMaxTokens;
  const int64_t rows = swap ? n : m, cols = swap ? m : n, tile_cols = swap ? 64 : 128;
  const int64_t tiles = ((rows + 127) / 128) * ((cols + tile_cols - 1) / tile_cols);
  const Fp8GemmVariant variant = swap ? Fp8GemmVariant::kSwapAB128x64 : Fp8GemmVariant::kTile128x128;
  const int64_t sms = std::max(num_sms, 1);
  // One tile per SM already keeps >= 90% of the SMs busy (or there are several waves): plain data-parallel.
  if (tiles == 0 || tiles * 10 >= sms * 9) return {variant, Fp8GemmDecomposition::kDataParallel, 1, tiles};
  // Fewer tiles than SMs: a data-parallel launch would leave SMs idle (decode shapes are memory-bound, so idle SMs
  // are idle bandwidth). Split K evenly if that fills >= 90% of the SMs, else let stream-K balance it.
  const int64_t k_blocks = (k + 127) / 128;
  const int64_t splits = std::min(sms / tiles, k_blocks / kMinKBlocksPerSplit);
  if (splits <= 1) {
    return {variant,
            k_blocks >= 2 * kMinKBlocksPerSplit ? Fp8GemmDecomposition::kStreamK : Fp8GemmDecomposition::kDataParallel,
            1, tiles};
  }
  if (splits * tiles * 10 >= sms * 9) {
    return {variant, Fp8GemmDecomposition::kSplitK, static_cast<int32_t>(splits), tiles};
  }
  return {variant, Fp8GemmDecomposition::kStreamK, 1, tiles};
}

}  // namespace dsv3
