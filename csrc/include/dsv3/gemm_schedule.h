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
  // epilogue overlap the other's MMAs; data-parallel only
  kPingpong64x128 = 2,
  // kTile128x128 in clusters of two CTAs side by side along N, which share each 128 x 128 tile of a through TMA
  // multicast: a quarter less traffic from L2 into the SMs. At M = 4096 the 128x128 tiles at 59% of the FP8 peak
  // already move ~9 TB/s from L2 (32 KB per 128x128x128 block), a likely limit that multicast relieves. Not chosen
  // by the heuristic until benchmarks/sweep_gemm_schedule.py has measured it on a GPU.
  kTile128x128Cluster1x2 = 3,
  // hand-written 128x128 kernel (not CUTLASS) whose consumer warp groups keep two sets of accumulators, so that one
  // 128-deep K block's scale promotion overlaps the next block's MMAs instead of draining the tensor cores after
  // every block; data-parallel only. Not chosen by the heuristic until a GPU sweep has measured it;
  // DSV3_FP8_GEMM_KERNEL=overlap runs every GEMM on it.
  kTile128x128Overlap = 4,
  // kTile128x128Overlap in 1x2 clusters that share each tile of a by multicast (DSV3_FP8_GEMM_KERNEL=overlap_cluster)
  kTile128x128OverlapCluster1x2 = 5,
  // hand-written decode kernel: out^T tiles of 128 weight rows x 64 tokens, two CTAs per SM, K split over a cluster
  // of 1-8 CTAs whose partial sums are reduced through distributed shared memory (split-K without a workspace);
  // `splits` is the cluster's size (decode_splits when the environment asks for it). Not chosen by the heuristic
  // until a GPU sweep has measured it; DSV3_FP8_GEMM_KERNEL=decode runs the dense and the masked grouped GEMMs on it.
  kDecode128x64 = 6,
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
// Measured on an H200 (132 SMs) by benchmarks/sweep_gemm_schedule.py over DeepSeek-V3's shapes at 1-4096 tokens
// (benchmarks/results/NVIDIA_H200-*-gemm-schedules.json; tests/test_gemm_schedule.py holds the heuristic to them):
// - with >= 48 ping-pong tiles, ping-pong 64x128 beat every other schedule up to 128 tokens (N=7168 K=16384:
//   45 us against 48-50; N=7168 K=2048: 12.0-12.6 against 12.9-14.3; N=24576: 20.2 against 20.9-23.2), and up to
//   512 tokens while its tiles fit one wave (N=1536/2048 at M=512: 22.4/23.0 against 23.5/24.3); with more tiles
//   at more tokens it lost to the cooperative 128x128 tiles (M=512 N=4096: 38 against 30 us);
// - a CTA takes ~0.8 us per 128-wide K block whatever the token count, so small-M GEMMs with few output tiles are
//   bound by the K loop of each CTA and gain from splitting K;
// - but each extra split costs a partial-sum reduction: 2-3 splits won every case with >= 16 K blocks per split
//   (N=576/1536/2048 at K=7168: 3 splits, 17-19 us, against 20-28 us for stream-K or 8-11 splits), and more lost;
// - between one and two waves of 128x128 tiles the second wave leaves SMs idle and stream-K won when K is long
//   (M=4096 N=576 K=7168: 40.6 against 52.1 us; M=512 N=7168 K=16384: 114 against 123) but not at K=2048 (23.6
//   against 22.1); from three waves on, one CTA per tile was as fast or faster (M=4096 N=1536: 80.7 against 85.8).
constexpr int64_t kMinPingpongTiles = 48;
constexpr int64_t kPingpongMaxTokens = 128;
constexpr int64_t kMaxSplits = 3;
constexpr int64_t kMinKBlocksPerSplit = 16;

inline Fp8GemmSchedule choose_fp8_gemm_schedule(int64_t m, int64_t n, int64_t k, int num_sms) {
  const int64_t sms = std::max(num_sms, 1);
  const int64_t n_tiles = (n + 127) / 128;
  const int64_t pingpong_tiles = (m + 63) / 64 * n_tiles;
  if (pingpong_tiles >= kMinPingpongTiles && (m <= kPingpongMaxTokens || pingpong_tiles <= sms)) {
    return {Fp8GemmVariant::kPingpong64x128, Fp8GemmDecomposition::kDataParallel, 1, pingpong_tiles};
  }
  const bool swap = m <= kSwapABMaxTokens;
  const int64_t tiles = swap ? n_tiles * ((m + 63) / 64) : (m + 127) / 128 * n_tiles;
  const Fp8GemmVariant variant = swap ? Fp8GemmVariant::kSwapAB128x64 : Fp8GemmVariant::kTile128x128;
  const int64_t k_blocks = (k + 127) / 128;
  if (tiles > sms && tiles < 2 * sms && k_blocks >= 2 * kMinKBlocksPerSplit) {
    return {variant, Fp8GemmDecomposition::kStreamK, 1, tiles};
  }
  // Split K only while the splits still fit on the SMs side by side and each keeps a long K loop.
  const int64_t splits = tiles == 0 ? 1 : std::min({kMaxSplits, sms / tiles, k_blocks / kMinKBlocksPerSplit});
  if (splits <= 1) return {variant, Fp8GemmDecomposition::kDataParallel, 1, tiles};
  return {variant, Fp8GemmDecomposition::kSplitK, static_cast<int32_t>(splits), tiles};
}

// The decode kernel's K splits for `tiles` tiles of 128 weight rows x 64 tokens: enough CTAs to fill the two each SM
// runs (a CTA keeps four K blocks of the weight in flight; the weight's bytes in flight, not the arithmetic, set
// the speed of a decode GEMM), at most a portable cluster of 8, and at least kDecodeMinKBlocksPerSplit K blocks
// each so a split's pipeline fill is paid over several blocks.
constexpr int64_t kDecodeCtasPerSm = 2;
// DSV3_FP8_GEMM_KERNEL=decode runs dense GEMMs of up to this many rows (one tile of tokens) and masked grouped ones
// expecting up to this many rows a group on the decode kernel, and leaves larger ones to the heuristic's kernels.
constexpr int64_t kDecodeMaxTokens = 64;
constexpr int64_t kDecodeMaxSplits = 8;
constexpr int64_t kDecodeMinKBlocksPerSplit = 4;

inline int32_t decode_splits(int64_t tiles, int64_t k, int num_sms) {
  if (tiles <= 0) return 1;
  const int64_t slots = kDecodeCtasPerSm * std::max(num_sms, 1);
  const int64_t splits = std::min({slots / tiles, kDecodeMaxSplits, (k + 127) / 128 / kDecodeMinKBlocksPerSplit});
  return static_cast<int32_t>(std::max<int64_t>(splits, 1));
}

}  // namespace dsv3
