#pragma once
// MLA decode on sm_90a for query tiles of 64 rows (64 or more heads) over the bf16 cache, with the query rows as the
// M = 64 side of the warpgroup MMAs (mla_decode_kernel.cuh puts the page there instead, which suits 16 or 32 rows):
//   S   [64 rows, 64 tokens] = Q [64, 576] · Kᵀ         warpgroup 0; A = Q, B = the page's K, both K-major
//   O_w [64 rows, 256]     += P [64, 64 tokens] · V_w   warpgroup w, V_w = latent columns [256 w, 256 w + 256) of
//                                                       the same page read N-major; A = P, from registers in
//                                                       warpgroup 0 and from shared memory in warpgroup 1
// Warpgroup 0 runs the online softmax. A row's 64 scores sit in the four lanes of one quad, so its maximum and sum
// take two shuffles and no shared memory; P stays in registers as the A operand of warpgroup 0's own P·V, and goes
// to shared memory (with each row's rescale factor) for warpgroup 1. Warpgroup 0 then issues its P·V and the next
// page's S back to back while warpgroup 1 multiplies its half. Each page's K is read from shared memory once, by S.
// The hand-offs are named barriers that the producer arrives at without waiting:
//   kPReady       P and the factors of a page are in shared memory            (0 arrives, 1 waits)
//   kPFree        warpgroup 1's P·V of a page is done: P may be rewritten     (1 arrives, 0 waits)
//   kStageDone+s  warpgroup 0's P·V of the page in stage s is done            (0 arrives, 1 waits; then thread 128
//                                                                              refills the stage)
//   kAll          the end of a split: the row statistics for both epilogues
// The schedule, page validation, NaN poisoning and outputs are those of mla_decode_kernel (same workspace layout).
//
// Shared memory: Q (9 chunks of [64 rows][64 dims], 73728 bytes), two stages of one page each (TMA, 73728 bytes
// each), P [64 rows][64 tokens] bf16 (8192 bytes), per-row factors, sums and maxima, mbarriers.

#include "cuda/mla/mla_decode_kernel.cuh"

namespace dsv3::cuda::mla {

struct RowsLayout {
  static constexpr int kRows = 64;
  static constexpr int kStages = 2;
  static constexpr int kQBytes = kRows * kChunks * 128;
  static constexpr int kPBytes = kRows * 128;
  static constexpr int kQOffset = 0;
  static constexpr int kRingOffset = kQOffset + kQBytes;
  static constexpr int kPOffset = kRingOffset + kStages * kTileBytes;
  static constexpr int kSmallOffset = kPOffset + kPBytes;
  static constexpr int kSmallBytes = 3 * kRows * 4 + (kStages + 1) * 8;  // factors, sums, maxima; mbarriers
  static constexpr int kBytes = kSmallOffset + kSmallBytes + 1024;       // + alignment slack
  static_assert(kBytes <= kSharedMemoryLimit, "shared memory budget");
};

namespace rows_barrier {
constexpr uint32_t kAll = 1, kPReady = 2, kPFree = 3, kStageDone = 4 /* and 5 */, kWarpgroup0 = 6;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_rows_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap cache_map,
                           const MlaDecodeParams p, float scale_log2) {
  using Layout = RowsLayout;
  constexpr int kStages = Layout::kStages;
  constexpr float kNegInf = -INFINITY;
  namespace bar = rows_barrier;

  extern __shared__ uint8_t shared_raw[];
  uint8_t* smem = shared_raw + ((1024 - (smem_address(shared_raw) & 1023)) & 1023);
  uint8_t* q_smem = smem + Layout::kQOffset;
  uint8_t* ring = smem + Layout::kRingOffset;
  uint8_t* p_smem = smem + Layout::kPOffset;
  float* row_factor = reinterpret_cast<float*>(smem + Layout::kSmallOffset);  // [64] this page's rescale factors
  float* row_sum = row_factor + Layout::kRows;                                // [64] a split's softmax denominators
  float* row_max = row_sum + Layout::kRows;                                   // [64] a split's maxima (log2 domain)
  uint64_t* full = reinterpret_cast<uint64_t*>(row_max + Layout::kRows);      // [kStages]
  uint64_t* q_full = full + kStages;

  const int thread = threadIdx.x, warp = (thread % 128) / 32, lane = thread % 32;
  // the warpgroup, broadcast from lane 0 so that the compiler sees it warp-uniform: branches on it do not diverge, and
  // wgmmas left in flight across them are not serialized
  const int wg = __shfl_sync(0xFFFFFFFFu, thread / 128, 0);
  const int quad_lane = lane % 4;
  const int row0 = 16 * warp + lane / 4;  // this thread's accumulator rows: row0 and row0 + 8
  const int rows = static_cast<int>(p.s_q * p.heads);
  const int tile_row0 = blockIdx.y * Layout::kRows;
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
    prefetch_tensor_map(&cache_map);
  }
  __syncthreads();

  PageLoader<Layout::kRows, false> loader(cursor);  // thread 128 runs ahead by kStages pages
  if (thread == 128) {
    for (int s = 0; s < kStages && !loader.done(); ++s) loader.load(p, &cache_map, ring + s * kTileBytes, &full[s]);
  }

  int split = meta[4];
  int consumed = 0;        // pages of this CTA done so far, across splits
  int pending_stage = -1;  // warpgroup 0: the stage whose P·V was issued last and not yet known complete
  uint32_t q_phase = 0;
  while (!cursor.done()) {
    // ---- a split: one sequence's pages [cursor.block, cursor.hi) in this part ----
    SplitState state = begin_split(p, cursor, split);
    const int seq = state.seq, seqlen = state.seqlen;
    // only warpgroup 0 reads Q, and its last S of the previous split is complete
    if (thread == 0) load_query_tile<Layout::kRows>(&q_map, q_smem, seq * rows + tile_row0, q_full);

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.0f;
    // warpgroup 0: the online softmax state of rows row0 (index 0) and row0 + 8 (index 1); sums are this thread's
    // share of the row (its 16 of the 64 columns), added across the quad at the end of the split
    float running_max[2] = {kNegInf, kNegInf}, partial_sum[2] = {0.0f, 0.0f};
    const int visible_end[2] = {visible_keys(p, tile_row0 + row0, rows, seqlen),
                                visible_keys(p, tile_row0 + row0 + 8, rows, seqlen)};
    if (wg == 0) {
      mbarrier_wait(q_full, q_phase);
    }
    q_phase ^= 1;

    while (true) {
      const int block = cursor.block;
      const int stage_index = consumed % kStages;
      const uint32_t phase = (consumed / kStages) & 1;
      const int32_t page = p.block_table[static_cast<int64_t>(seq) * p.max_blocks + block];
      state.poisoned |= page < 0 || page >= p.num_blocks;
      const int valid = seqlen - block * kMlaPageSize < kMlaPageSize ? seqlen - block * kMlaPageSize : kMlaPageSize;
      uint8_t* tile = ring + stage_index * kTileBytes;
      const uint32_t tile_address = smem_address(tile);

      if (wg == 0) {
        mbarrier_wait(&full[stage_index], phase);
        if (valid < kMlaPageSize) {  // V rows past the sequence's end become zeros (P = 0 there must not meet NaN)
          const int units = (kMlaPageSize - valid) * 64;
          for (int u = thread; u < units; u += 128) {
            const int row = valid + u / 64, chunk = (u / 8) % 8, unit = u % 8;
            *reinterpret_cast<uint4*>(tile + chunk * kChunkBytes + row * 128 + unit * 16) = make_uint4(0, 0, 0, 0);
          }
          fence_proxy_async();
          named_barrier(bar::kWarpgroup0, 128);
        }

        // ---- S = Q · Kᵀ, then (its wgmmas queued behind the previous page's P·V) the previous stage is done ----
        float s[32];
        const uint64_t q_descriptor = sw128_descriptor(smem_address(q_smem), 16, 1024);
        const uint64_t k_descriptor = sw128_descriptor(tile_address, 16, 1024);
        wgmma_fence();
        static_for<kChunks * 4>([&](auto step) {
          constexpr int c = decltype(step)::value / 4, kk = decltype(step)::value % 4;
          const uint64_t a = advance_descriptor<c * Layout::kRows * 128 + kk * 32>(q_descriptor);
          const uint64_t b = advance_descriptor<c * kChunkBytes + kk * 32>(k_descriptor);
          Wgmma<64>::template mma<0>(s, a, b, decltype(step)::value != 0);
        });
        wgmma_commit();
        if (pending_stage >= 0) {
          wgmma_wait<1>();
          named_barrier_arrive(bar::kStageDone + pending_stage, kThreads);
          pending_stage = -1;
        }
        wgmma_wait<0>();
        fence_registers(s);
#pragma unroll
        for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(o[i])::"memory");

        // ---- online softmax over the page's 64 tokens (columns), log2 domain ----
        // s[i]: row row0 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 quad_lane + i % 2
        float block_max[2] = {kNegInf, kNegInf};
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          const int h = (i / 2) % 2;
          const int token = block * kMlaPageSize + 8 * (i / 4) + 2 * quad_lane + i % 2;
          s[i] = token < visible_end[h] ? s[i] * scale_log2 : kNegInf;  // a select: NaN keys past the end never survive
          block_max[h] = fmaxf(block_max[h], s[i]);
        }
        float factor[2], reference[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          block_max[h] = fmaxf(block_max[h], __shfl_xor_sync(0xFFFFFFFFu, block_max[h], 1));
          block_max[h] = fmaxf(block_max[h], __shfl_xor_sync(0xFFFFFFFFu, block_max[h], 2));
          const float m = fmaxf(running_max[h], block_max[h]);
          reference[h] = m == kNegInf ? 0.0f : m;  // a row with nothing visible yet: exp2(-inf - 0) = 0
          factor[h] = exp2f(running_max[h] - reference[h]);
          running_max[h] = m;
          partial_sum[h] *= factor[h];
        }
        uint32_t pa[4][4];  // P as the A operand, per 16-token step: (row0, 2q..), (row0 + 8, 2q..), then +8 columns
#pragma unroll
        for (int i = 0; i < 32; i += 2) {
          const int h = (i / 2) % 2;
          const float w0 = exp2f(s[i] - reference[h]), w1 = exp2f(s[i + 1] - reference[h]);
          partial_sum[h] += w0 + w1;
          pa[i / 8][(i / 2) % 4] = pack_bf16x2(w0, w1);
        }

        // ---- hand P and the factors to warpgroup 1 (P [64 rows][64 tokens], K-major, 128B-swizzled) ----
        if (consumed > 0) named_barrier(bar::kPFree, kThreads);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {  // word r: row row0 + 8 (r % 2), 8-token chunk 2 j + r / 2
            const int row = row0 + 8 * (r % 2), chunk = 2 * j + r / 2;
            *reinterpret_cast<uint32_t*>(p_smem + swizzled_offset(row, chunk) + 4 * quad_lane) = pa[j][r];
          }
        }
        if (quad_lane == 0) {
          row_factor[row0] = factor[0];
          row_factor[row0 + 8] = factor[1];
        }
        fence_proxy_async();
        named_barrier_arrive(bar::kPReady, kThreads);

        // ---- O_0 = O_0 * factor + P · V_0, left running behind the next page's S ----
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] *= factor[(i / 2) % 2];
        const uint64_t v_descriptor = sw128_descriptor(tile_address, kChunkBytes, 1024);
        wgmma_fence();
        static_for<4>([&](auto kk) {
          // 16 tokens = 2048 bytes of N-major V further
          WgmmaN256::mma_rs(o, pa[decltype(kk)::value], advance_descriptor<decltype(kk)::value * 2048>(v_descriptor),
                            1);
        });
        wgmma_commit();
        pending_stage = stage_index;
      } else {
        // ---- warpgroup 1: O_1 = O_1 * factor + P · V_1 once warpgroup 0 has handed P over ----
        named_barrier(bar::kPReady, kThreads);
        mbarrier_wait(&full[stage_index], phase);  // (complete already: makes the page's bytes visible here too)
        const float factor_low = row_factor[row0], factor_high = row_factor[row0 + 8];
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] *= (i / 2) % 2 ? factor_high : factor_low;
        const uint64_t p_descriptor = sw128_descriptor(smem_address(p_smem), 16, 1024);
        const uint64_t v_descriptor = sw128_descriptor(tile_address + 4 * kChunkBytes, kChunkBytes, 1024);
        wgmma_fence();
        static_for<4>([&](auto kk) {
          WgmmaN256::mma_ss(o, advance_descriptor<decltype(kk)::value * 32>(p_descriptor),
                            advance_descriptor<decltype(kk)::value * 2048>(v_descriptor), 1);
        });
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(o[i])::"memory");
        named_barrier_arrive(bar::kPFree, kThreads);
        named_barrier(bar::kStageDone + stage_index, kThreads);  // warpgroup 0's P·V of this page is done too
        if (thread == 128 && !loader.done()) {
          loader.load(p, &cache_map, ring + stage_index * kTileBytes, &full[stage_index]);
        }
      }
      ++consumed;
      const bool last = block + 1 >= cursor.hi;
      cursor.advance();
      if (last) break;
    }

    // ---- epilogue: row sums and maxima from warpgroup 0, then out = O / sum and lse ----
    if (wg == 0) {
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(o[i])::"memory");
      named_barrier_arrive(bar::kStageDone + pending_stage, kThreads);
      pending_stage = -1;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        partial_sum[h] += __shfl_xor_sync(0xFFFFFFFFu, partial_sum[h], 1);
        partial_sum[h] += __shfl_xor_sync(0xFFFFFFFFu, partial_sum[h], 2);
      }
      if (quad_lane == 0) {
        row_sum[row0] = partial_sum[0];
        row_sum[row0 + 8] = partial_sum[1];
        row_max[row0] = running_max[0];
        row_max[row0 + 8] = running_max[1];
      }
    }
    named_barrier(bar::kAll, kThreads);

    if (state.writable) {
      const int64_t dv = p.head_dim_v;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = tile_row0 + row0 + 8 * h;
        if (row >= rows) continue;
        const float inverse = output_scale(state, row_sum[row0 + 8 * h]);
#pragma unroll
        for (int i = 0; i < 128; i += 4) {  // o[i + 2 h], o[i + 2 h + 1]: columns 8 (i / 4) + 2 quad_lane and + 1
          const int64_t d = wg * 256 + 8 * (i / 4) + 2 * quad_lane;
          if (d >= dv) continue;
          const float first = o[i + 2 * h] * inverse, second = o[i + 2 * h + 1] * inverse;
          const bool pair = d + 1 < dv;
          if (state.direct) {
            uint16_t* out = p.out + (static_cast<int64_t>(seq) * rows + row) * dv + d;
            if (pair && dv % 2 == 0) {
              *reinterpret_cast<uint32_t*>(out) = pack_bf16x2(first, second);
            } else {
              out[0] = __bfloat16_as_ushort(__float2bfloat16_rn(first));
              if (pair) out[1] = __bfloat16_as_ushort(__float2bfloat16_rn(second));
            }
          } else {
            float* out = p.partial_out + (static_cast<int64_t>(split) * rows + row) * dv + d;
            out[0] = first;
            if (pair) out[1] = second;
          }
        }
      }
      if (wg == 0 && quad_lane == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = tile_row0 + row0 + 8 * h;
          if (row < rows) write_lse(p, state, split, row, row_max[row0 + 8 * h], row_sum[row0 + 8 * h]);
        }
      }
    }
    named_barrier(bar::kAll, kThreads);  // the row statistics are rewritten by the next split
    ++split;
  }
  // warpgroup 1 arrived at kPFree after its last P·V; nobody rewrites P any more, but the barrier must not be left
  // with a pending arrival
  if (wg == 0) named_barrier(bar::kPFree, kThreads);
}

}  // namespace dsv3::cuda::mla
