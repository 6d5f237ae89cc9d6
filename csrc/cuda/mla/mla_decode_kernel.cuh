#pragma once
// MLA decode on sm_90a: one CTA runs one split-KV part (dsv3/mla_schedule.h) for one tile of N query rows, over the
// part's 64-token KV pages, with wgmma for Q·Kᵀ and P·V.
//
// The tile is "swapped": the 64-token page is the M = 64 side of both products and the N (16, 32 or 64) query rows
// of the tile (rows are (query token, head) pairs, s_q * h of them per sequence) are the wgmma N side, so 16 heads
// use N = 16 instead of padding them to 64:
//   Sᵀ [64 tokens, N] = K [64 tokens, 576] · Qᵀ      A = K  (K-major: a token's 576 values are contiguous)
//   Oᵀ [512, N]      += Vᵀ [512, 64 tokens] · Pᵀ     A = Vᵀ (M-major: the same K tile, read transposed)
// Two consumer warpgroups share the work: warpgroup w runs the online softmax for query columns [w N/2, (w+1) N/2),
// writes its bf16 Pᵀ columns to shared memory, and accumulates Oᵀ rows [256 w, 256 w + 256) (the V columns 0..255
// or 256..511) for all N columns. Each column's softmax statistics live in the warpgroup that owns it; the per-page
// rescale factors and the final sums reach the other warpgroup through shared memory. Sᵀ: for N <= 32 warpgroup w
// multiplies latent chunks 4w..4w+3 (and w = 0 the rope chunk) by all N columns and the two swap the partial sums
// of each other's columns, so each K tile is read from shared memory once (an m64nNk16 wgmma costs about what an
// m64n(N/2)k16 one does: reading its 64-row A operand dominates); at N = 64 each computes its own columns over all
// chunks (the whole-tile accumulators would not fit in registers next to Oᵀ).
//
// Shared memory (every big buffer starts on a 1024-byte boundary, one 128-byte swizzle atom of 8 rows):
//   Q      9 chunks of [N rows][64 dims] bf16, 128-byte rows, 128B-swizzled (TMA)              N * 1152 bytes
//   tiles  bf16 cache: 2 stages of 9 chunks of [64 tokens][64 dims], 128B-swizzled (TMA)       2 * 73728 bytes
//          FP8 cache:  kStages raw pages of 64 x 656 bytes (one bulk copy each) + one bf16 tile (two at N = 16)
//                      that the consumers fill by widening the e4m3 codes (exact in bf16; a TMA tile's layout)
//   Pᵀ     [N rows][64 tokens] bf16, 128B-swizzled (the K-major B operand of P·V)                N * 128 bytes
//          FP8 cache: four of them, P * scale_g(token) for latent group g                       4 * N * 128
//   scales FP8 cache: each tile's [64 tokens][4] fp32 group scales                         1024 bytes each
//   swap   bf16 cache, N <= 32: the partial scores the warpgroups exchange (FP8: in the Pᵀ buffers)  N * 256 bytes
//   small  cross-warp reductions, per-column rescale factors / sums / maxima, mbarriers
//
// FP8 cache: scales stay out of the tensor-core inputs, so keys are used at full precision, as the fp32 reference
// does. Scores: Sᵀ = Σ_g scale_g(token) · (E_g · Q_gᵀ) + R · Q_ropeᵀ, each latent group in its own accumulator that
// is scaled per row (a row is a token) and added in fp32. Values: V_g = E_g · scale_g(token) with the scale on the
// K side of P·V, so it moves onto P: Oᵀ rows of group g use Pᵀ_g = Pᵀ * scale_g(token) (rounded to bf16 like P).
// Thread 0 issues all copies; a page's stage is refilled once both warpgroups are done with it (a named barrier
// after P·V, or after unpacking for FP8), so loads of the next stages overlap the math of this one. FP8 at N = 16
// also overlaps the unpacking: while page k's Q·Kᵀ wgmmas run, the threads widen page k + 1 into the other tile.
//
// Invalid input never leads to an out-of-bounds access: a page id outside the cache is not loaded, block indices
// are clamped to the block table, a sequence range outside the batch ends the part, and a split whose id does not
// belong to its sequence writes nothing. Splits that met any of these (or a schedule that does not match
// cache_seqlens) write NaN outputs and lse instead of a plausible wrong result.

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cmath>
#include <cstdint>

#include "cuda/mla/mla_ptx.cuh"
#include "dsv3/mla_params.h"

namespace dsv3::cuda::mla {

constexpr int kThreads = 256;  // two consumer warpgroups
constexpr int kSharedMemoryLimit = 232448;
constexpr int kChunks = kMlaHeadDim / 64;  // 9 column chunks of 64 bf16 (128 bytes: one swizzle row)
constexpr int kChunkBytes = kMlaPageSize * 128;
constexpr int kTileBytes = kChunks * kChunkBytes;               // 73728: one bf16 page
constexpr int kRawPageBytes = kMlaPageSize * kMlaFp8RowBytes;   // 41984: one FP8 page, contiguous in the cache
constexpr int kSmallBytes = (2 * 4 * 32 + 3 * 64) * 4 + 8 * 8;  // reductions, column stats, barriers
static_assert(kRawPageBytes % 1024 == 0 && kTileBytes % 1024 == 0, "stages must keep 1024-byte alignment");

template <int N, bool kFp8>
struct DecodeLayout {
  static_assert(N == 16 || N == 32 || N == 64, "query tile of 16, 32 or 64 rows");
  static constexpr int kQBytes = N * kChunks * 128;
  // Pᵀ: one [N][64 tokens] bf16 buffer; FP8: one per latent group g, holding P * scale_g(token) (see below).
  static constexpr int kPBufferBytes = N * 128;
  static constexpr int kPBytes = kPBufferBytes * (kFp8 ? 4 : 1);
  // N <= 32: the warpgroups split Q·Kᵀ by chunks and swap partial sums, [2 warpgroups][N / 4][128 threads] fp32; the
  // FP8 layout passes them through its Pᵀ buffers (not in use at that point), the bf16 one has room of its own.
  static constexpr bool kSplitScores = N <= 32;
  // FP8 at N = 16: two unpacked tiles (and their scales) fit next to one raw stage, so the next page is unpacked
  // while this one's Q·Kᵀ runs; the other FP8 tiles unpack each page into the one tile before using it.
  static constexpr bool kPipelined = kFp8 && N == 16;
  static constexpr int kTiles = kFp8 ? (kPipelined ? 2 : 1) : 0;
  static_assert(!kPipelined || kSplitScores, "the unpacking overlaps the split Q·Kᵀ");
  static constexpr int kScaleBytes = kTiles * kMlaPageSize * 4 * 4;  // FP8: each tile's [64 tokens][4] scales
  static constexpr int kExchangeBytes = kSplitScores && !kFp8 ? 2 * (N / 4) * 128 * 4 : 0;
  static_assert(!kSplitScores || !kFp8 || kPBytes >= 2 * (N / 4) * 128 * 4, "the exchange fits in the Pᵀ buffers");
  static constexpr int kFixedBytes =
      kQBytes + kPBytes + kScaleBytes + kExchangeBytes + kSmallBytes + 1024 /* alignment slack */;
  // FP8: as many raw stages as fit (up to 3) next to the unpacked tiles; bf16: two TMA tile stages.
  static constexpr int kFp8Stages = (kSharedMemoryLimit - kFixedBytes - kTiles * kTileBytes) / kRawPageBytes > 3
                                        ? 3
                                        : (kSharedMemoryLimit - kFixedBytes - kTiles * kTileBytes) / kRawPageBytes;
  static constexpr int kStages = kFp8 ? kFp8Stages : 2;
  static constexpr int kStageBytes = kFp8 ? kRawPageBytes : kTileBytes;
  static constexpr int kQOffset = 0;
  static constexpr int kTileOffset = kQOffset + kQBytes;  // the unpacked tiles (FP8 only)
  static constexpr int kRingOffset = kTileOffset + kTiles * kTileBytes;
  static constexpr int kPOffset = kRingOffset + kStages * kStageBytes;
  static constexpr int kScaleOffset = kPOffset + kPBytes;
  static constexpr int kExchangeOffset = kScaleOffset + kScaleBytes;
  static constexpr int kSmallOffset = kExchangeOffset + kExchangeBytes;
  static constexpr int kBytes = kSmallOffset + kSmallBytes + 1024;
  static_assert(kStages >= 1 && kBytes <= kSharedMemoryLimit, "shared memory budget");
  static_assert(kQBytes % 1024 == 0 && kPBytes % 1024 == 0, "1024-byte aligned buffers");
};

// Byte offset of element (row, 16-byte chunk) in a buffer of 128-byte rows with the 128-byte swizzle (what TMA's
// CU_TENSOR_MAP_SWIZZLE_128B writes and the wgmma descriptors with layout type 1 read).
__device__ __forceinline__ uint32_t swizzled_offset(uint32_t row, uint32_t chunk) {
  return row * 128 + ((chunk ^ (row & 7)) << 4);
}

// The (sequence, block) pages of one part in order, skipping sequences with nothing to do. Block ranges are clamped
// to the sequence (and the block table), so a stale or forged schedule cannot address past either.
struct PartCursor {
  const MlaDecodeParams* p;
  int begin_seq, begin_block, end_seq, end_block;
  int seq, block, hi;

  __device__ int blocks_of(int s) const {
    const int32_t seqlen = p->cache_seqlens[s];
    if (seqlen <= 0) return 0;
    const int64_t blocks = mla_blocks(seqlen);
    return static_cast<int>(blocks < p->max_blocks ? blocks : p->max_blocks);
  }
  __device__ int lo_of(int s) const { return s == begin_seq ? (begin_block > 0 ? begin_block : 0) : 0; }
  __device__ int hi_of(int s) const {
    const int blocks = blocks_of(s);
    return s == end_seq ? (end_block < blocks ? end_block : blocks) : blocks;
  }
  __device__ void skip_empty() {
    while (block >= hi && seq < end_seq) {
      ++seq;
      block = lo_of(seq);
      hi = hi_of(seq);
    }
  }
  __device__ void start() {
    seq = begin_seq;
    block = lo_of(seq);
    hi = hi_of(seq);
    skip_empty();
  }
  __device__ bool done() const { return block >= hi; }
  __device__ void advance() {
    ++block;
    skip_empty();
  }
};

template <int N, bool kFp8>
__device__ __forceinline__ void issue_page_load(const MlaDecodeParams& p, const CUtensorMap* cache_map,
                                                const PartCursor& cursor, uint8_t* stage, uint64_t* full) {
  const int32_t page = p.block_table[static_cast<int64_t>(cursor.seq) * p.max_blocks + cursor.block];
  if (page < 0 || page >= p.num_blocks) {
    mbarrier_arrive(full);  // nothing loaded; the consumers see the bad id themselves and poison the split
    return;
  }
  if constexpr (kFp8) {
    mbarrier_arrive_expect_tx(full, kRawPageBytes);
    bulk_load(stage, p.kv_cache + static_cast<int64_t>(page) * kRawPageBytes, kRawPageBytes, full);
  } else {
    mbarrier_arrive_expect_tx(full, kTileBytes);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) tma_load_2d(stage + c * kChunkBytes, cache_map, c * 64, page * 64, full);
  }
}

// Thread 0's copies, in page order. A stage is refilled only once its page has been used, so the stages keep one
// or two pages per SM on their way from HBM; `ahead` also asks the L2 for the kL2Ahead pages beyond the one being
// loaded (a page is contiguous in the cache: one bulk prefetch each), so that the stage loads find them there.
template <int N, bool kFp8>
struct PageLoader {
  static constexpr int kPageBytes = kFp8 ? kRawPageBytes : kTileBytes;
  static constexpr int kL2Ahead = kFp8 ? 4 : 2;  // 150-170 KB per CTA either way
  PartCursor next, ahead;
  int next_index = 0, ahead_index = 0;

  __device__ explicit PageLoader(const PartCursor& first) : next(first), ahead(first) {}
  __device__ bool done() const { return next.done(); }
  __device__ void load(const MlaDecodeParams& p, const CUtensorMap* cache_map, uint8_t* stage, uint64_t* full) {
    for (; !ahead.done() && ahead_index <= next_index + kL2Ahead; ahead.advance(), ++ahead_index) {
      if (ahead_index == next_index) continue;  // loaded right now
      const int32_t page = p.block_table[static_cast<int64_t>(ahead.seq) * p.max_blocks + ahead.block];
      if (page >= 0 && page < p.num_blocks)
        prefetch_l2(p.kv_cache + static_cast<int64_t>(page) * kPageBytes, kPageBytes);
    }
    issue_page_load<N, kFp8>(p, cache_map, next, stage, full);
    next.advance();
    ++next_index;
  }
};

// Four e4m3 codes (one word, the first code in the low byte) -> four bf16 values in two bf16x2 words, exactly.
// The conversion path takes four conversion instructions per pair of codes (e4m3 -> f16x2 -> two f32 -> bf16x2);
// this takes a byte permute, a shift and a mask per pair of codes plus one bf16 multiply, and no conversion unit.
// A code s.eeee.mmm written as the bf16 bits s.0000eeee.mmm0000 reads as its value times 2^-120: both formats spend
// their exponent field the same way (exponent 0 marks the subnormals, the mantissa continues the leading zeros), so
// normal and subnormal codes alike are 2^120 away, and the multiply by 2^120 is exact.
// The result's flag bits (0x80 of a byte) mark NaN codes (s.1111.111), which this mapping would read as ±480: the
// caller widens such rows the slow way instead.
__device__ __forceinline__ uint32_t widen_e4m3x4(uint32_t codes, uint32_t& low, uint32_t& high) {
  constexpr uint32_t kFields = 0x87F087F0u;  // sign, exponent and mantissa of each bf16 half after the shift
  constexpr uint32_t kTwoPow120 = 0x7B807B80u;
  // each 16-bit half becomes [code, its sign replicated over a byte] (prmt's sign-replicating selector nibbles)
  uint32_t low_pair, high_pair;
  asm("prmt.b32 %0, %1, 0, 0x9180;" : "=r"(low_pair) : "r"(codes));
  asm("prmt.b32 %0, %1, 0, 0xB3A2;" : "=r"(high_pair) : "r"(codes));
  low_pair = (low_pair << 4) & kFields;
  high_pair = (high_pair << 4) & kFields;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(low) : "r"(low_pair), "r"(kTwoPow120));
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(high) : "r"(high_pair), "r"(kTwoPow120));
  return ((codes & 0x7F7F7F7Fu) + 0x01010101u) & 0x80808080u;  // a byte with all seven low bits set carries to 0x80
}

// Eight e4m3 codes -> eight bf16 through the conversion instructions (NaN codes stay NaN).
__device__ __forceinline__ uint4 widen_e4m3x8_converting(uint2 codes) {
  const uint32_t words[2] = {codes.x, codes.y};
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>(words[i / 2] >> (16 * (i % 2)));
    const float2 values = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
    const __nv_bfloat162 widened = __floats2bfloat162_rn(values.x, values.y);  // exact: e4m3 fits bf16
    out[i] = *reinterpret_cast<const uint32_t*>(&widened);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// Raw 656-byte rows -> the swizzled bf16 tile (latent e4m3 codes widened exactly, rope copied) and the [64][4] group
// scales; rows >= valid become zeros (codes and scales), so P = 0 there cannot meet NaN in V.
// Thread t widens the 16-byte unit t % 8 of latent chunk (t / 8) % 8 in rows t / 64 + 4 i (i = 0..15): its columns
// are fixed, so every address is a base plus a constant, rows alternate between two swizzle patterns, and each
// batch of loads goes out before the conversions wait on it. A warp reads 256 contiguous bytes of a row and writes
// one 128-byte row segment of each of four chunks, so neither side has bank conflicts.
__device__ __forceinline__ void unpack_page(const uint8_t* raw, uint8_t* tile, float* scales, int valid) {
  constexpr int kRowStep = kThreads / 64;                  // 4: rows apart between a thread's latent units
  constexpr int kRowsPerThread = kMlaPageSize / kRowStep;  // 16
  constexpr int kBatch = 4;                                // loads in flight per thread
  static_assert(kThreads == 256, "64 threads per 4 rows x 8 chunks x 8 units, 8 per rope row");
  const int thread = threadIdx.x;
  if (thread < kMlaPageSize) {
    const float4 group_scales = thread < valid
                                    ? *reinterpret_cast<const float4*>(raw + thread * kMlaFp8RowBytes + kMlaLatentDim)
                                    : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    reinterpret_cast<float4*>(scales)[thread] = group_scales;
  }
  const int unit = thread % 8, chunk = (thread / 8) % 8, first_row = thread / 64;
  const uint8_t* source = raw + first_row * kMlaFp8RowBytes + chunk * 64 + unit * 8;
  // rows first_row + 8 j (swizzle row & 7 = first_row) and first_row + 4 + 8 j (row & 7 = first_row + 4)
  uint8_t* even_rows = tile + chunk * kChunkBytes + first_row * 128 + ((unit ^ first_row) << 4);
  uint8_t* odd_rows = tile + chunk * kChunkBytes + (first_row + 4) * 128 + ((unit ^ first_row ^ 4) << 4);
  auto destination = [&](int i) { return (i % 2 ? odd_rows : even_rows) + (i / 2) * 8 * 128; };
  uint32_t nan_flags = 0;
#pragma unroll
  for (int batch = 0; batch < kRowsPerThread; batch += kBatch) {
    uint2 codes[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = batch + j;
      codes[j] = first_row + kRowStep * i < valid
                     ? *reinterpret_cast<const uint2*>(source + i * kRowStep * kMlaFp8RowBytes)
                     : make_uint2(0, 0);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      uint4 packed;
      nan_flags |= widen_e4m3x4(codes[j].x, packed.x, packed.y) | widen_e4m3x4(codes[j].y, packed.z, packed.w);
      *reinterpret_cast<uint4*>(destination(batch + j)) = packed;
    }
  }
  if (nan_flags != 0) {  // a NaN code among this thread's rows (never written by append_kv_cache)
    for (int i = 0; i < kRowsPerThread; ++i) {
      if (first_row + kRowStep * i < valid) {
        const uint2 codes = *reinterpret_cast<const uint2*>(source + i * kRowStep * kMlaFp8RowBytes);
        *reinterpret_cast<uint4*>(destination(i)) = widen_e4m3x8_converting(codes);
      }
    }
  }
  // the rope: 64 rows x 8 sixteen-byte units of bf16, two per thread, copied
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int row = thread / 8 + 32 * j;
    const uint4 rope =
        row < valid ? *reinterpret_cast<const uint4*>(raw + row * kMlaFp8RowBytes + kMlaLatentDim + 16 + unit * 16)
                    : make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(tile + (kChunks - 1) * kChunkBytes + swizzled_offset(row, unit)) = rope;
  }
}

// Zeroes the V part (chunks 0..7) of rows [valid, 64) of a TMA-loaded tile.
__device__ __forceinline__ void zero_tail_rows(uint8_t* tile, int valid) {
  const int units = (kMlaPageSize - valid) * 64;
  for (int u = threadIdx.x; u < units; u += kThreads) {
    const int row = valid + u / 64, chunk = (u / 8) % 8, unit = u % 8;
    *reinterpret_cast<uint4*>(tile + chunk * kChunkBytes + row * 128 + unit * 16) = make_uint4(0, 0, 0, 0);
  }
}

// What a split (one sequence's pages [cursor.block, cursor.hi) in a part) knows before its first page.
struct SplitState {
  int seq;
  bool poisoned;  // inputs that contradict each other (a bad page id adds to it later): out and lse become NaN
  bool writable;  // the split id belongs to the sequence (a stale or forged schedule writes nothing)
  bool direct;    // the sequence's only split: results go to out and lse, with no combine
  int seqlen;     // keys the queries may see (all of the part's pages when poisoned)
};

__device__ __forceinline__ SplitState begin_split(const MlaDecodeParams& p, const PartCursor& cursor, int split) {
  SplitState s;
  s.seq = cursor.seq;
  const int32_t seqlen = p.cache_seqlens[s.seq];
  const int32_t split_lo = p.split_offsets[s.seq], split_hi = p.split_offsets[s.seq + 1];
  s.poisoned = seqlen < 0 || seqlen > p.max_blocks * kMlaPageSize ||
               (s.seq == cursor.begin_seq && cursor.begin_block < 0) ||
               (s.seq == cursor.end_seq && cursor.end_block > mla_blocks(seqlen)) || p.split_offsets[0] != 0;
  s.writable = split >= split_lo && split < split_hi && split_hi <= mla_max_splits(p.batch, p.num_parts);
  s.direct = split_hi - split_lo == 1;
  s.seqlen = s.poisoned ? cursor.hi * kMlaPageSize : seqlen;
  return s;
}

// Keys that query row `row` of its sequence (of `rows` = s_q * heads; padding rows count as the last token) sees:
// with causal masking, those up to its own position among the s_q new tokens.
__device__ __forceinline__ int visible_keys(const MlaDecodeParams& p, int row, int rows, int seqlen) {
  const int query_token = row < rows ? row / static_cast<int>(p.heads) : static_cast<int>(p.s_q) - 1;
  const int causal_end = seqlen - static_cast<int>(p.s_q) + query_token + 1;
  return p.causal && causal_end < seqlen ? causal_end : seqlen;
}

// Rows [row0, row0 + kRows) of the sequence's queries into kChunks 128B-swizzled chunks of [kRows][64] (thread 0).
template <int kRows>
__device__ __forceinline__ void load_query_tile(const CUtensorMap* q_map, uint8_t* q_smem, int row0, uint64_t* q_full) {
  mbarrier_arrive_expect_tx(q_full, kRows * kChunks * 128);
#pragma unroll
  for (int c = 0; c < kChunks; ++c) tma_load_2d(q_smem + c * kRows * 128, q_map, c * 64, row0, q_full);
}

// The lse of query row `row` (natural log) from its maximum (log2 domain) and softmax sum, to lse or partial_lse.
__device__ __forceinline__ void write_lse(const MlaDecodeParams& p, const SplitState& state, int split, int row,
                                          float max, float sum) {
  const int heads = static_cast<int>(p.heads), s_q = static_cast<int>(p.s_q);
  const int token = row / heads, head = row % heads;
  // an empty split's -inf makes the combine skip it, so a NaN sum must stay NaN here
  float lse = sum > 0.0f    ? (max + log2f(sum)) * 0.69314718055994531f
              : sum == 0.0f ? (state.direct ? INFINITY : -INFINITY)
                            : NAN;
  if (state.poisoned) lse = NAN;
  if (state.direct) {
    p.lse[(static_cast<int64_t>(state.seq) * heads + head) * s_q + token] = lse;
  } else {
    p.partial_lse[(static_cast<int64_t>(split) * heads + head) * s_q + token] = lse;
  }
}

// 1 / sum for a query row's outputs: 0 when it saw nothing (out 0), NaN when poisoned or when a NaN key or value
// met the row (which must reach the output).
__device__ __forceinline__ float output_scale(const SplitState& state, float sum) {
  return state.poisoned ? NAN : (sum > 0.0f ? 1.0f / sum : (sum == 0.0f ? 0.0f : NAN));
}

// Sᵀ columns of q_descriptor's kCols rows (a tile of N rows per chunk) over chunks [kFirst, kFirst + kCount):
// acc = (or += with kAccumulate) K · Qᵀ. K-major operands: a 16-wide k-step is 32 bytes along the 128-byte rows.
template <int kCols, int N, int kFirst, int kCount, bool kAccumulate>
__device__ __forceinline__ void score_chunks(float (&acc)[kCols / 2], uint64_t k_descriptor, uint64_t q_descriptor) {
  static_for<kCount * 4>([&](auto step) {
    constexpr int c = kFirst + decltype(step)::value / 4, kk = decltype(step)::value % 4;
    const uint64_t a = advance_descriptor<c * kChunkBytes + kk * 32>(k_descriptor);
    const uint64_t b = advance_descriptor<c * N * 128 + kk * 32>(q_descriptor);
    Wgmma<kCols>::template mma<0>(acc, a, b, kAccumulate || decltype(step)::value != 0);
  });
}

// FP8 cache: s += scale_g(token) * group, the token being the accumulator's row.
template <int kCount>
__device__ __forceinline__ void add_scaled_group(float (&s)[kCount], const float (&group)[kCount],
                                                 const float* page_scales, int g, int warp, int lane) {
  const float scale_low = page_scales[(warp * 16 + lane / 4) * 4 + g];
  const float scale_high = page_scales[(warp * 16 + lane / 4 + 8) * 4 + g];
#pragma unroll
  for (int i = 0; i < kCount; ++i) s[i] += ((i / 2) % 2 ? scale_high : scale_low) * group[i];
}

template <int N, bool kFp8>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap cache_map,
                      const MlaDecodeParams p, float scale_log2) {
  using Layout = DecodeLayout<N, kFp8>;
  constexpr int kHalf = N / 2;       // Sᵀ columns of one warpgroup
  constexpr int kColsS = kHalf / 4;  // Sᵀ columns held by a thread (2 per 8-column group)
  constexpr int kStages = Layout::kStages;
  constexpr float kNegInf = -INFINITY;

  extern __shared__ uint8_t shared_raw[];
  // Pointer arithmetic on the shared array (not integer casts) keeps the accesses in the shared address space.
  uint8_t* smem = shared_raw + ((1024 - (smem_address(shared_raw) & 1023)) & 1023);
  uint8_t* q_smem = smem + Layout::kQOffset;
  uint8_t* ring = smem + Layout::kRingOffset;
  uint8_t* p_smem = smem + Layout::kPOffset;
  float* scale_buffers = reinterpret_cast<float*>(smem + Layout::kScaleOffset);  // FP8: [tiles][64 tokens][4]
  float* reduction = reinterpret_cast<float*>(smem + Layout::kSmallOffset);      // [2 warpgroups][4 warps][32 columns]
  float* column_alpha = reduction + 2 * 4 * 32;                                  // [N] per-page rescale factors
  float* column_max = column_alpha;       // [N] final maxima (log2 domain), in the epilogue when the factors are done
  float* column_sum = column_alpha + 64;  // [N] final softmax denominators
  int* visible_end = reinterpret_cast<int*>(column_sum + 64);      // [N] keys each column sees
  uint64_t* full = reinterpret_cast<uint64_t*>(visible_end + 64);  // [kStages]
  uint64_t* q_full = full + kStages;

  const int thread = threadIdx.x, wg = thread / 128, warp = (thread % 128) / 32, lane = thread % 32;
  const int rows = static_cast<int>(p.s_q * p.heads);
  const int tile_row0 = blockIdx.y * N;
  const int32_t* meta = p.metadata + static_cast<int64_t>(blockIdx.x) * kMlaMetadataInts;
  PartCursor cursor{&p, meta[0], meta[1], meta[2], meta[3], 0, 0, 0};
  if (cursor.begin_seq > cursor.end_seq || cursor.begin_seq < 0 || cursor.end_seq >= p.batch) return;
  cursor.start();
  if (cursor.done()) return;

  if (thread == 0) {
    for (int s = 0; s < kStages; ++s) mbarrier_init(&full[s], 1);
    mbarrier_init(q_full, 1);
    fence_barrier_init();
    prefetch_tensor_map(&q_map);
    if (!kFp8) prefetch_tensor_map(&cache_map);
  }
  __syncthreads();

  PageLoader<N, kFp8> loader(cursor);  // thread 0 runs ahead by kStages pages
  if (thread == 0) {
    for (int s = 0; s < kStages && !loader.done(); ++s)
      loader.load(p, &cache_map, ring + s * Layout::kStageBytes, &full[s]);
  }

  // FP8 at N = 16: `unpacker` walks the pages one ahead of `cursor`, widening page u into tile u % 2 as soon as its
  // raw stage has arrived; the stage is refilled after the next barrier every thread passes.
  PartCursor unpacker = cursor;
  int unpacked = 0;
  const auto unpack_next = [&]() {
    const int slot = unpacked % kStages;
    const int64_t keys = static_cast<int64_t>(p.cache_seqlens[unpacker.seq]) - int64_t{unpacker.block} * kMlaPageSize;
    mbarrier_wait(&full[slot], (unpacked / kStages) & 1);
    unpack_page(ring + slot * Layout::kStageBytes, smem + Layout::kTileOffset + (unpacked % 2) * kTileBytes,
                scale_buffers + (unpacked % 2) * kMlaPageSize * 4, static_cast<int>(keys < 0 ? 0 : keys));
    fence_proxy_async();
    ++unpacked;
    unpacker.advance();
  };
  const auto refill = [&]() {  // after a barrier that follows unpack_next in every thread
    if (thread == 0 && !loader.done()) {
      loader.load(p, &cache_map, ring + ((unpacked - 1) % kStages) * Layout::kStageBytes,
                  &full[(unpacked - 1) % kStages]);
    }
  };

  int split = meta[4];
  int consumed = 0;
  uint32_t q_phase = 0;
  while (!cursor.done()) {
    // ---- a split: one sequence's pages [cursor.block, cursor.hi) in this part ----
    SplitState state = begin_split(p, cursor, split);
    const int seq = state.seq, seqlen = state.seqlen;
    if (thread == 0) load_query_tile<N>(&q_map, q_smem, seq * rows + tile_row0, q_full);

    // Per thread: Sᵀ columns j (0..kColsS) are local column 8 (j / 2) + 2 (lane % 4) + j % 2 of this warpgroup.
    float running_max[kColsS], partial_sum[kColsS];
#pragma unroll
    for (int j = 0; j < kColsS; ++j) {
      running_max[j] = kNegInf;
      partial_sum[j] = 0.0f;
    }
    // How many of the sequence's keys each query column sees (kept in shared memory: registers are scarce at N = 64).
    if (thread < N) visible_end[thread] = visible_keys(p, tile_row0 + thread, rows, seqlen);
    float o[4][N / 2];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int i = 0; i < N / 2; ++i) o[mt][i] = 0.0f;
    }

    named_barrier(1, kThreads);  // visible_end is written
    mbarrier_wait(q_full, q_phase);
    q_phase ^= 1;

    while (true) {
      const int block = cursor.block;
      const int slot = consumed % kStages;
      const uint32_t phase = (consumed / kStages) & 1;
      const int32_t page = p.block_table[static_cast<int64_t>(seq) * p.max_blocks + block];
      state.poisoned |= page < 0 || page >= p.num_blocks;
      const int valid = seqlen - block * kMlaPageSize < kMlaPageSize ? seqlen - block * kMlaPageSize : kMlaPageSize;
      uint8_t* stage = ring + slot * Layout::kStageBytes;
      const float* page_scales = scale_buffers + (Layout::kPipelined ? (consumed % 2) * kMlaPageSize * 4 : 0);
      if (!Layout::kPipelined) mbarrier_wait(&full[slot], phase);

      uint8_t* tile;
      if constexpr (Layout::kPipelined) {
        if (unpacked == consumed) {  // the first page; every later one was unpacked during the page before it
          unpack_next();
          named_barrier(1, kThreads);
          refill();
        }
        tile = smem + Layout::kTileOffset + (consumed % 2) * kTileBytes;
      } else if constexpr (kFp8) {
        tile = smem + Layout::kTileOffset;
        unpack_page(stage, tile, scale_buffers, valid);
        fence_proxy_async();
        named_barrier(1, kThreads);
        if (thread == 0 && !loader.done()) loader.load(p, &cache_map, stage, &full[slot]);  // the raw stage is free
      } else {
        tile = stage;
        if (valid < kMlaPageSize) {
          zero_tail_rows(tile, valid);
          fence_proxy_async();
          named_barrier(1, kThreads);
        }
      }

      // ---- Sᵀ = K · Qᵀ: 9 chunks x 4 k-steps of 16; s holds this warpgroup's kHalf columns ----
      float s[kHalf / 2];
      const uint32_t tile_address = smem_address(tile);
      const uint64_t k_descriptor = sw128_descriptor(tile_address, 16, 1024);
      if constexpr (Layout::kSplitScores) {
        // Warpgroup w multiplies latent chunks 4w..4w+3 (w = 0 also the rope chunk) by all N columns of Q, so the
        // K tile is read from shared memory once; each then adds the other's partial sums for its own columns.
        float partial[N / 2];
        const uint64_t q_descriptor = sw128_descriptor(smem_address(q_smem), 16, 1024);
        const auto multiply = [&](auto first_chunk) {
          constexpr int kFirst = decltype(first_chunk)::value;
          if constexpr (!kFp8) {
            wgmma_fence();
            score_chunks<N, N, kFirst, 4, false>(partial, k_descriptor, q_descriptor);
            if constexpr (kFirst == 0) score_chunks<N, N, kChunks - 1, 1, true>(partial, k_descriptor, q_descriptor);
            wgmma_commit();
            wgmma_wait<0>();
            fence_registers(partial);
          } else {
            float group[2][N / 2];
#pragma unroll
            for (int i = 0; i < N / 2; ++i) partial[i] = 0.0f;
            wgmma_fence();
            if constexpr (kFirst == 0) score_chunks<N, N, kChunks - 1, 1, false>(partial, k_descriptor, q_descriptor);
            score_chunks<N, N, kFirst, 2, false>(group[0], k_descriptor, q_descriptor);
            score_chunks<N, N, kFirst + 2, 2, false>(group[1], k_descriptor, q_descriptor);
            wgmma_commit();
            if (Layout::kPipelined && !unpacker.done()) unpack_next();  // touches no accumulator
            wgmma_wait<0>();
            fence_registers(partial);
            fence_registers(group[0]);
            fence_registers(group[1]);
            add_scaled_group(partial, group[0], page_scales, kFirst / 2, warp, lane);
            add_scaled_group(partial, group[1], page_scales, kFirst / 2 + 1, warp, lane);
          }
        };
        if (wg == 0) {
          multiply(std::integral_constant<int, 0>{});
        } else {
          multiply(std::integral_constant<int, 4>{});
        }
        // partial[i] with i / (kHalf / 2) == w belongs to warpgroup w's columns; the rest goes through `exchange`
        // ([writer][accumulator][thread], conflict-free), compile-time indices only so partial stays in registers.
        float* exchange = reinterpret_cast<float*>(smem + (kFp8 ? Layout::kPOffset : Layout::kExchangeOffset));
        const int t = thread % 128;
#pragma unroll
        for (int i = 0; i < kHalf / 2; ++i) {
          exchange[(wg * (kHalf / 2) + i) * 128 + t] = wg == 0 ? partial[kHalf / 2 + i] : partial[i];
        }
        named_barrier(1, kThreads);
        if constexpr (Layout::kPipelined) refill();
#pragma unroll
        for (int i = 0; i < kHalf / 2; ++i) {
          s[i] = (wg == 0 ? partial[i] : partial[kHalf / 2 + i]) + exchange[((1 - wg) * (kHalf / 2) + i) * 128 + t];
        }
        if constexpr (kFp8) named_barrier(1, kThreads);  // the exchange is read before Pᵀ overwrites it
      } else {
        // each warpgroup its own kHalf columns over all chunks
#pragma unroll
        for (int i = 0; i < kHalf / 2; ++i) s[i] = 0.0f;
        const uint64_t q_descriptor = sw128_descriptor(smem_address(q_smem) + wg * kHalf * 128, 16, 1024);
        if constexpr (!kFp8) {
          wgmma_fence();
          score_chunks<kHalf, N, 0, kChunks, false>(s, k_descriptor, q_descriptor);
          wgmma_commit();
          wgmma_wait<0>();
          fence_registers(s);
        } else {
          // the rope chunk (bf16, unscaled) straight into s, then the latent groups two at a time (registers)
          wgmma_fence();
          score_chunks<kHalf, N, kChunks - 1, 1, false>(s, k_descriptor, q_descriptor);
          wgmma_commit();
          static_for<2>([&](auto batch) {
            constexpr int kFirstGroup = 2 * decltype(batch)::value;
            float group[2][kHalf / 2];
            wgmma_fence();
            score_chunks<kHalf, N, 2 * kFirstGroup, 2, false>(group[0], k_descriptor, q_descriptor);
            score_chunks<kHalf, N, 2 * kFirstGroup + 2, 2, false>(group[1], k_descriptor, q_descriptor);
            wgmma_commit();
            wgmma_wait<0>();
            fence_registers(s);
            fence_registers(group[0]);
            fence_registers(group[1]);
            add_scaled_group(s, group[0], page_scales, kFirstGroup, warp, lane);
            add_scaled_group(s, group[1], page_scales, kFirstGroup + 1, warp, lane);
          });
        }
      }
      // ---- online softmax over the 64 tokens (rows) of each column, log2 domain ----
      float block_max[kColsS];
#pragma unroll
      for (int j = 0; j < kColsS; ++j) block_max[j] = kNegInf;
#pragma unroll
      for (int i = 0; i < kHalf / 2; ++i) {
        const int j = (i / 4) * 2 + i % 2;
        const int token = warp * 16 + lane / 4 + 8 * ((i / 2) % 2);
        const bool visible =
            block * kMlaPageSize + token < visible_end[wg * kHalf + (j / 2) * 8 + 2 * (lane % 4) + j % 2];
        s[i] = visible ? s[i] * scale_log2 : kNegInf;  // a select: NaN keys past the end never survive
        block_max[j] = fmaxf(block_max[j], s[i]);
      }
#pragma unroll
      for (int j = 0; j < kColsS; ++j) {
#pragma unroll
        for (int offset = 4; offset < 32; offset *= 2) {
          block_max[j] = fmaxf(block_max[j], __shfl_xor_sync(0xFFFFFFFFu, block_max[j], offset));
        }
      }
      float* wg_reduction = reduction + wg * 4 * 32;
      if (lane < 4) {
#pragma unroll
        for (int j = 0; j < kColsS; ++j) wg_reduction[warp * 32 + (j / 2) * 8 + 2 * lane + j % 2] = block_max[j];
      }
      named_barrier(2 + wg, 128);
      float alpha[kColsS], reference[kColsS];
#pragma unroll
      for (int j = 0; j < kColsS; ++j) {
        const int column = (j / 2) * 8 + 2 * (lane % 4) + j % 2;
        float m = running_max[j];
#pragma unroll
        for (int w = 0; w < 4; ++w) m = fmaxf(m, wg_reduction[w * 32 + column]);
        reference[j] = m == kNegInf ? 0.0f : m;  // a column with nothing visible yet: exp2(-inf - 0) = 0
        alpha[j] = exp2f(running_max[j] - reference[j]);
        running_max[j] = m;
        partial_sum[j] *= alpha[j];
      }
#pragma unroll
      for (int i = 0; i < kHalf / 2; ++i) {
        const int j = (i / 4) * 2 + i % 2;
        const int token = warp * 16 + lane / 4 + 8 * ((i / 2) % 2);
        const float weight = exp2f(s[i] - reference[j]);
        partial_sum[j] += weight;
        const int n = wg * kHalf + (j / 2) * 8 + 2 * (lane % 4) + j % 2;  // Pᵀ row
        const uint32_t offset = swizzled_offset(n, token / 8) + (token % 8) * 2;
        if constexpr (kFp8) {
#pragma unroll
          for (int g = 0; g < 4; ++g) {
            *reinterpret_cast<__nv_bfloat16*>(p_smem + g * Layout::kPBufferBytes + offset) =
                __float2bfloat16_rn(weight * page_scales[token * 4 + g]);
          }
        } else {
          *reinterpret_cast<__nv_bfloat16*>(p_smem + offset) = __float2bfloat16_rn(weight);
        }
      }
      if (warp == 0 && lane < 4) {
#pragma unroll
        for (int j = 0; j < kColsS; ++j) column_alpha[wg * kHalf + (j / 2) * 8 + 2 * lane + j % 2] = alpha[j];
      }
      fence_proxy_async();
      named_barrier(1, kThreads);

      // ---- Oᵀ = Oᵀ * alpha + Vᵀ · Pᵀ for V columns [256 wg, 256 wg + 256) ----
#pragma unroll
      for (int i = 0; i < N / 2; ++i) {
        const float factor = column_alpha[(i / 4) * 8 + 2 * (lane % 4) + i % 2];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) o[mt][i] *= factor;
      }
      // Vᵀ is M-major: M = the 64 V columns of chunk 4 wg + mt (one 128-byte row per token), K = 16 tokens = two
      // 8-row swizzle atoms 1024 bytes apart (the stride byte offset). The leading byte offset would step to the next
      // 64 columns; an M = 64 operand never uses it.
      const uint64_t v_descriptor = sw128_descriptor(tile_address + wg * 4 * kChunkBytes, kChunkBytes, 1024);
      // FP8: V columns 256 wg + 64 mt belong to latent group 2 wg + mt / 2, whose scales sit in its own Pᵀ buffer
      const uint64_t p_descriptor =
          sw128_descriptor(smem_address(p_smem) + (kFp8 ? 2 * wg * Layout::kPBufferBytes : 0), 16, 1024);
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) fence_registers(o[mt]);
      wgmma_fence();
      static_for<16>([&](auto step) {
        constexpr int mt = decltype(step)::value / 4, kk = decltype(step)::value % 4;
        const uint64_t a = advance_descriptor<mt * kChunkBytes + kk * 16 * 128>(v_descriptor);
        const uint64_t b = advance_descriptor<(kFp8 ? (mt / 2) * Layout::kPBufferBytes : 0) + kk * 32>(p_descriptor);
        Wgmma<N>::template mma<1>(o[mt], a, b, 1);
      });
      wgmma_commit();
      wgmma_wait<0>();
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) fence_registers(o[mt]);
      named_barrier(1, kThreads);  // the tile, Pᵀ and the factors are free again
      if (!kFp8 && thread == 0 && !loader.done()) loader.load(p, &cache_map, stage, &full[slot]);
      ++consumed;
      const bool last = block + 1 >= cursor.hi;
      cursor.advance();
      if (last) break;
    }

    // ---- epilogue: column sums, then out = Oᵀ / sum and lse ----
#pragma unroll
    for (int j = 0; j < kColsS; ++j) {
#pragma unroll
      for (int offset = 4; offset < 32; offset *= 2) {
        partial_sum[j] += __shfl_xor_sync(0xFFFFFFFFu, partial_sum[j], offset);
      }
    }
    float* wg_reduction = reduction + wg * 4 * 32;
    if (lane < 4) {
#pragma unroll
      for (int j = 0; j < kColsS; ++j) wg_reduction[warp * 32 + (j / 2) * 8 + 2 * lane + j % 2] = partial_sum[j];
    }
    named_barrier(2 + wg, 128);
    if (warp == 0 && lane < 4) {
#pragma unroll
      for (int j = 0; j < kColsS; ++j) {
        const int column = (j / 2) * 8 + 2 * lane + j % 2;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < 4; ++w) sum += wg_reduction[w * 32 + column];
        column_sum[wg * kHalf + column] = sum;
        column_max[wg * kHalf + column] = running_max[j];
      }
    }
    named_barrier(1, kThreads);

    if (state.writable) {
      const int64_t dv = p.head_dim_v;
#pragma unroll
      for (int i = 0; i < N / 2; ++i) {
        const int n = (i / 4) * 8 + 2 * (lane % 4) + i % 2;
        const int row = tile_row0 + n;
        if (row >= rows) continue;
        const float inverse = output_scale(state, column_sum[n]);
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
          const int64_t d = wg * 256 + mt * 64 + warp * 16 + lane / 4 + 8 * ((i / 2) % 2);
          if (d >= dv) continue;
          const float value = o[mt][i] * inverse;
          if (state.direct) {
            p.out[(static_cast<int64_t>(seq) * rows + row) * dv + d] = __bfloat16_as_ushort(__float2bfloat16_rn(value));
          } else {
            p.partial_out[(static_cast<int64_t>(split) * rows + row) * dv + d] = value;
          }
        }
      }
      if (thread < N && tile_row0 + thread < rows) {
        write_lse(p, state, split, tile_row0 + thread, column_max[thread], column_sum[thread]);
      }
    }
    named_barrier(1, kThreads);  // column statistics and reductions are reused by the next split
    ++split;
  }
}

// Merges the splits of every sequence that has several: lse = log Σ exp(lse_i), out = Σ exp(lse_i - lse) out_i.
// A sequence without splits gets out 0 and lse +inf; one whose split offsets contradict cache_seqlens (a stale
// schedule) or reach past the workspace gets NaN. Never-written workspace rows hold NaN (the launcher fills them).
// Grid: (batch, s_q * heads); each block merges one query row. A long sequence at a small batch is cut into as many
// splits as there are SMs, so the splits' lse values are staged through shared memory a chunk at a time and each
// thread adds its head_dim_v / 128 output values over the splits in order, their loads independent of one another
// (a loop whose every step waited for one global load made this step cost more than the decode kernel).
constexpr int kCombineThreads = 128;
constexpr int kCombineChunk = kCombineThreads;  // splits staged in shared memory at a time
constexpr int kCombineValuesPerThread = kMlaLatentDim / kCombineThreads;

__global__ void __launch_bounds__(kCombineThreads) mla_combine_kernel(const MlaDecodeParams p) {
  const int64_t seq = blockIdx.x, row = blockIdx.y;
  const int32_t first = p.split_offsets[seq], count = p.split_offsets[seq + 1] - first;
  const int32_t seqlen = p.cache_seqlens[seq];
  const bool consistent = p.split_offsets[0] == 0 && count >= 0 && first >= 0 &&
                          p.split_offsets[seq + 1] <= mla_max_splits(p.batch, p.num_parts) && seqlen >= 0 &&
                          seqlen <= p.max_blocks * kMlaPageSize && (count > 0) == (seqlen > 0);
  if (consistent && count == 1) return;  // written directly by the decode kernel
  const int64_t rows = p.s_q * p.heads, dv = p.head_dim_v;
  const int64_t token = row / p.heads, head = row % p.heads;

  __shared__ float split_lse[kCombineChunk];
  __shared__ float weight[kCombineChunk];
  // Every thread of the block calls this with the same begin (count and lse are uniform across the block).
  auto stage = [&](int32_t begin) {
    __syncthreads();  // the previous chunk is no longer read
    const int32_t i = begin + static_cast<int32_t>(threadIdx.x);
    if (i < count) split_lse[threadIdx.x] = p.partial_lse[((first + int64_t{i}) * p.heads + head) * p.s_q + token];
    __syncthreads();
    return min(kCombineChunk, count - begin);
  };

  float lse = consistent ? INFINITY : NAN;
  if (consistent && count > 0) {
    bool nan = false;
    float max_lse = -INFINITY;
    for (int32_t begin = 0; begin < count; begin += kCombineChunk) {
      const int32_t n = stage(begin);
      for (int32_t i = 0; i < n; ++i) {
        nan |= split_lse[i] != split_lse[i];
        max_lse = fmaxf(max_lse, split_lse[i]);
      }
    }
    if (nan) {
      lse = NAN;
    } else if (max_lse != -INFINITY) {
      float sum = 0.0f;
      for (int32_t begin = 0; begin < count; begin += kCombineChunk) {
        const int32_t n = stage(begin);
        for (int32_t i = 0; i < n; ++i) sum += expf(split_lse[i] - max_lse);
      }
      lse = max_lse + logf(sum);
    }
  }

  float merged[kCombineValuesPerThread];
#pragma unroll
  for (int j = 0; j < kCombineValuesPerThread; ++j) merged[j] = lse != lse ? NAN : 0.0f;
  if (lse == lse && lse != INFINITY) {
    for (int32_t begin = 0; begin < count; begin += kCombineChunk) {
      const int32_t n = stage(begin);
      if (static_cast<int32_t>(threadIdx.x) < n) weight[threadIdx.x] = expf(split_lse[threadIdx.x] - lse);
      __syncthreads();
#pragma unroll 4
      for (int32_t i = 0; i < n; ++i) {
        if (split_lse[i] == -INFINITY) continue;  // an empty split's output is undefined
        const float w = weight[i];
        const float* values = p.partial_out + ((first + int64_t{begin + i}) * rows + row) * dv;
#pragma unroll
        for (int j = 0; j < kCombineValuesPerThread; ++j) {
          const int64_t d = threadIdx.x + j * kCombineThreads;
          if (d < dv) merged[j] += w * values[d];
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kCombineValuesPerThread; ++j) {
    const int64_t d = threadIdx.x + j * kCombineThreads;
    if (d < dv) p.out[(seq * rows + row) * dv + d] = __bfloat16_as_ushort(__float2bfloat16_rn(merged[j]));
  }
  if (threadIdx.x == 0) p.lse[(seq * p.heads + head) * p.s_q + token] = lse;
}

}  // namespace dsv3::cuda::mla
