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
  // 64 (tokens) x 128 tiles, the two consumer warp groups alternating tiles so that one's scale promotion and
  // epilogue overlap the other's MMAs; data-parallel only (not chosen by the heuristic until measured faster)
  kPingpong64x128 = 2,
};

enum class Fp8GemmDecomposition : int32_t {
  kDataParallel = 0,  // one CTA per output tile (persistent over waves)
  kSplitK = 1,        // `splits` CTAs share each tile's K range; partial sums reduced through the workspace
  kStreamK = 2,       // K iterations of all tiles spread evenly over the SMs (only when forced: never faster here)
};

struct Fp8GemmSchedule {
  Fp8GemmVariant variant;
  Fp8GemmDecomposition decomposition;
  int32_t splits;  // > 1 only for kSplitK
  int64_t tiles;   // output tiles of the chosen variant
};

constexpr int64_t kSwapABMaxTokens = 64;
// Measured on an H200 (132 SMs) by benchmarks/sweep_gemm_schedule.py over DeepSeek-V3's shapes at 1-128 tokens:
// - a CTA takes ~0.8 us per 128-wide K block whatever the token count, so small-M GEMMs with few output tiles are
//   bound by the K loop of each CTA and gain from splitting K;
// - but each extra split costs a partial-sum reduction: 2-3 splits won every case with >= 16 K blocks per split
//   (N=576/1536/2048 at K=7168: 3 splits, 17-19 us, against 20-28 us for stream-K or 8-11 splits), and more lost;
// - stream-K never beat the best fixed split by more than noise, and lost to data-parallel on short K (N=7168 at
//   K=2048: 13 us data-parallel, 16 us stream-K).
constexpr int64_t kMaxSplits = 3;
constexpr int64_t kMinKBlocksPerSplit = 16;

inline Fp8GemmSchedule choose_fp8_gemm_schedule(int64_t m, int64_t n, int64_t k, int num_sms) {
  const bool swap = m <= kSwapABMaxTokens;
  const int64_t rows = swap ? n : m, cols = swap ? m : n, tile_cols = swap ? 64 : 128;
  const int64_t tiles = ((rows + 127) / 128) * ((cols + tile_cols - 1) / tile_cols);
  const Fp8GemmVariant variant = swap ? Fp8GemmVariant::kSwapAB128x64 : Fp8GemmVariant::kTile128x128;
  const int64_t sms = std::max(num_sms, 1);
  const int64_t k_blocks = (k + 127) / 128;
  // Split K only while the splits still fit on the SMs side by side and each keeps a long K loop.
  const int64_t splits = tiles == 0 ? 1 : std::min({kMaxSplits, sms / tiles, k_blocks / kMinKBlocksPerSplit});
  if (splits <= 1) return {variant, Fp8GemmDecomposition::kDataParallel, 1, tiles};
  return {variant, Fp8GemmDecomposition::kSplitK, static_cast<int32_t>(splits), tiles};
}

}  // namespace dsv3
