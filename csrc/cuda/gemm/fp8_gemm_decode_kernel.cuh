#pragma once
// Hand-written sm_90a FP8 block-scaled GEMM for decode, out[m, n] = (a * a_scales) @ (b * b_scales)^T in bf16 with
// few tokens (m up to 64 per tile): a GEMM that streams the weight once and does little arithmetic on it, so the
// time is the weight's bytes over the HBM bandwidth if enough of them are in flight.
//
// Each CTA computes out^T for a tile of 128 weight rows x 64 tokens (swap-AB: the weight fills the 64-row side of
// two consumer warpgroups' m64n64k32 wgmmas, the tokens their 64-wide side) over its share of K, one producer warp
// filling a ring of kStages (b, a, scales) stages: the two tiles by TMA, the block's 64 token scales and its weight
// scale by cp.async, all completing on the stage's mbarrier. Two CTAs share an SM, so one's tile boundary (pipeline
// fill, reduction, stores) overlaps the other's loads.
//
// Split K: the CTAs of a thread-block cluster (1 to 8, along x) take consecutive ranges of the tile's K blocks and
// put their fp32 partial results in shared memory; after a cluster barrier each CTA sums one slice of the tile's rows
// over all of them through distributed shared memory (in rank order, so the result does not depend on timing) and
// stores it in bf16. No workspace, no atomics, one kernel.
//
// Launched to overlap the kernel before it (programmatic dependent launch, fp8_linear's quantization), the dense
// kernel's producer asks for the first stages' weights, which no kernel of a decode step writes, before it waits for
// that kernel's output; launched in stream order the wait returns at once.
//
// Masked grouped (MoE decode, DeepGEMM's masked layout): a is [groups, m, k] seen as [groups * m, k], b [groups, n, k]
// as [groups * n, k]; group g's tiles cover its first masked_m[g] rows (clamped to [0, m], read on the device). The
// grid holds token_tile_stride tiles of tokens per group (from the caller's expected_m, so that a large m_max costs
// no crowd of idle CTAs); a cluster takes tiles t, t + stride, ... while they hold rows of its group (the weight
// tile streamed again for each), and leaves at once if its first one holds none.
//
// Edges: TMA zero-fills the parts of a tile past the tensors; boxes start inside them (a tile of tokens starts
// below its group's count, a tile of weight rows below n), token scales are read for rows clamped to the group's
// last one, and only rows < the group's count and columns < n are stored, so nothing outside the operands is read or
// written. Needs K % 16 == 0 (TMA row pitch) and n % 4 == 0 (four columns are summed and stored together).

#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/sm90_ptx.cuh"
#include "dsv3/gemm_schedule.h"  // kDecodeCtasPerSm, kDecodeMaxSplits

namespace dsv3::cuda::fp8_gemm_decode {

using namespace sm90;

constexpr int kWeightRows = 128;  // rows of b per tile (two warpgroups of 64)
constexpr int kTokens = 64;       // rows of a per tile
constexpr int kBlockK = 128;      // K per stage, one scale block
constexpr int kStages = 4;
constexpr int kWeightBytes = kWeightRows * kBlockK;
constexpr int kTokenBytes = kTokens * kBlockK;
constexpr int kTmaBytes = kWeightBytes + kTokenBytes;
constexpr int kScaleFloats = kTokens + 1;  // the tokens' scales, then the weight tile's
constexpr int kStageBytes = (kTmaBytes + 4 * kScaleFloats + 1023) / 1024 * 1024;  // TMA boxes start 1024-aligned
constexpr int kConsumerThreads = 256;
constexpr int kThreads = kConsumerThreads + 32;  // warps 0-7: two consumer warpgroups; warp 8: the producer
constexpr int kSharedBytes = kStages * kStageBytes + 2 * kStages * 8 + 1024;  // ring, barriers, alignment slack
// fp32 partial results [token][row], reusing the ring once the K loop is done; rows padded so that a warp's stores
// (8 rows x 4 token pairs) fall in distinct banks, and 16-byte aligned for the reduction's vector loads
constexpr int kPartialStride = kWeightRows + 4;
static_assert(kTokens * kPartialStride * 4 <= kStages * kStageBytes, "partial results fit in the ring");
static_assert(kDecodeCtasPerSm * (kSharedBytes + 1024) <= 228 * 1024, "two CTAs' shared memory fits an SM");
static_assert(kTokens == kDecodeMaxTokens, "the GEMMs routed here take one tile of tokens");

struct Arguments {
  const float* a_scales;     // [groups * m, k_blocks]
  const float* b_scales;     // [groups * n_tiles, k_blocks]
  uint16_t* out;             // [groups * m, n] bf16
  const int32_t* masked_m;   // [groups] rows of each group; null for a dense GEMM (one group of m rows)
  int m;                     // rows of a per group (dense: M; masked: m_max)
  int n, k_blocks, n_tiles;  // n_tiles of 128 weight rows
  int token_tile_stride;     // tiles of 64 tokens per group in the grid (dense: all ceil(m / 64) of them)
};

// D[64 x 64] (+)= A[64 x 32] * B[32 x 64], e4m3 inputs from 128-byte-swizzled K-major shared memory, fp32
// accumulators (32 per thread: rows 16 * warp + lane / 4 (+ 8), columns 8 * j + 2 * (lane % 4) (+ 1)).
__device__ __forceinline__ void wgmma_64x64x32_e4m3(float (&d)[32], uint64_t a, uint64_t b, uint32_t accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, "
      "%11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, "
      "%31}, %32, %33, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b), "r"(accumulate));
}

// The tile of a CTA: weight rows [weight_row, + 128) of b's [groups * n, k] view, tokens [token_row, + 64) of a's
// [groups * m, k] view (also the rows of out) of which those before token_end are its group's, and the K blocks
// [block_begin, block_end) of this CTA's split.
struct TileTask {
  int weight_row, n_tile, scale_tile;  // scale_tile: the row of b_scales
  int token_row, token_end;
  int block_begin, block_end;
};

// Cluster `cluster`'s first tile and split `rank` of `splits`; token_end <= token_row when the tile has no tokens.
template <bool kMasked>
__device__ __forceinline__ TileTask locate(const Arguments& args, int cluster, int rank, int splits) {
  TileTask task;
  task.n_tile = cluster % args.n_tiles;
  const int rest = cluster / args.n_tiles;
  const int token_tile = rest % args.token_tile_stride, group = rest / args.token_tile_stride;
  const int rows = kMasked ? min(max(__ldg(args.masked_m + group), 0), args.m) : args.m;
  task.weight_row = group * args.n + task.n_tile * kWeightRows;
  task.scale_tile = group * args.n_tiles + task.n_tile;
  task.token_row = group * args.m + token_tile * kTokens;
  task.token_end = group * args.m + rows;
  // balanced consecutive ranges: split r takes blocks [r * K / S, (r + 1) * K / S)
  task.block_begin = static_cast<int>(static_cast<int64_t>(rank) * args.k_blocks / splits);
  task.block_end = static_cast<int>(static_cast<int64_t>(rank + 1) * args.k_blocks / splits);
  return task;
}

// A stage's weight part, issued by one lane: the stage's expected bytes, the weight tile by TMA and its scale by
// cp.async. The stage completes once its token part (the tile of tokens and their scales) lands too.
__device__ __forceinline__ void load_weights(const CUtensorMap* b_map, const Arguments& args, const TileTask& task,
                                             uint8_t* slot, uint64_t* full, int block) {
  mbarrier_arrive_expect_tx(full, kTmaBytes);
  tma_load_2d(slot, b_map, block * kBlockK, task.weight_row, full);
  const float* weight_scales = args.b_scales + static_cast<int64_t>(task.scale_tile) * args.k_blocks;
  cp_async_4(reinterpret_cast<float*>(slot + kTmaBytes) + kTokens, weight_scales + block);
}

// The producer warp: per K block, the weight part (lane 0, see load_weights) unless it was issued already (the
// first `prefilled` blocks), then the token tile by TMA (lane 0) and the 64 token scales by cp.async (two per lane,
// rows clamped to the group's last), each lane's copies completing on the stage's barrier. Starts at `position` of
// the ring and returns where it stopped.
__device__ __forceinline__ RingPosition<kStages> produce(const CUtensorMap* a_map, const CUtensorMap* b_map,
                                                         const Arguments& args, const TileTask& task, uint8_t* ring,
                                                         uint64_t* full, uint64_t* empty,
                                                         RingPosition<kStages> position, int prefilled) {
  const int lane = threadIdx.x % 32;
  const float* token_scales[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = min(task.token_row + lane + 32 * i, task.token_end - 1);
    token_scales[i] = args.a_scales + static_cast<int64_t>(row) * args.k_blocks;
  }
  for (int block = task.block_begin; block < task.block_end; ++block) {
    const int stage = position.stage;
    uint8_t* slot = ring + stage * kStageBytes;
    if (block - task.block_begin >= prefilled) {
      mbarrier_wait(&empty[stage], position.phase ^ 1);  // a fresh barrier passes parity 1 at once
      if (lane == 0) load_weights(b_map, args, task, slot, &full[stage], block);
    }
    if (lane == 0) tma_load_2d(slot + kWeightBytes, a_map, block * kBlockK, task.token_row, &full[stage]);
    auto* scales = reinterpret_cast<float*>(slot + kTmaBytes);
    cp_async_4(scales + lane, token_scales[0] + block);
    cp_async_4(scales + lane + 32, token_scales[1] + block);
    cp_async_arrive_noinc(&full[stage]);
    position.advance();
  }
  return position;
}

// Consumer warpgroup wg (0 or 1): weight rows 64 * wg .. + 63 of the tile against its 64 tokens, over the CTA's K
// blocks, into `results` (this thread's fragment, fp32). Starts at `position` of the ring and returns where it
// stopped.
__device__ __forceinline__ RingPosition<kStages> consume(const TileTask& task, uint8_t* ring, uint64_t* full,
                                                         uint64_t* empty, int wg, RingPosition<kStages> position,
                                                         float (&results)[32]) {
  const int lane = threadIdx.x % 32;
  const uint32_t ring_address = smem_address(ring);
  float accumulators[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) results[i] = 0.0f;
  for (int block = task.block_begin; block < task.block_end; ++block) {
    const int stage = position.stage;
    mbarrier_wait(&full[stage], position.phase);
    const uint32_t slot = ring_address + stage * kStageBytes;
    // the MMA's A: this warpgroup's 64 weight rows; its B: the 64 tokens
    const uint64_t weights = sw128_descriptor(slot + wg * 64 * kBlockK, 16, 1024);
    const uint64_t tokens = sw128_descriptor(slot + kWeightBytes, 16, 1024);
    wgmma_fence();
    static_for<kBlockK / 32>([&](auto kk) {
      constexpr uint32_t kOffset = decltype(kk)::value * 32;
      wgmma_64x64x32_e4m3(accumulators, advance_descriptor<kOffset>(weights), advance_descriptor<kOffset>(tokens),
                          decltype(kk)::value > 0 ? 1u : 0u);
    });
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(accumulators);
    // times this thread's token scales (columns 8 * j + 2 * (lane % 4) + {0, 1}) and the weight tile's, read before
    // the stage is released
    const float* scales = reinterpret_cast<const float*>(ring + stage * kStageBytes + kTmaBytes);
    const float weight_scale = scales[kTokens];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float2 token_scale = *reinterpret_cast<const float2*>(scales + 8 * j + 2 * (lane % 4));
      const float scale0 = token_scale.x * weight_scale, scale1 = token_scale.y * weight_scale;
      results[4 * j + 0] = fmaf(accumulators[4 * j + 0], scale0, results[4 * j + 0]);
      results[4 * j + 1] = fmaf(accumulators[4 * j + 1], scale1, results[4 * j + 1]);
      results[4 * j + 2] = fmaf(accumulators[4 * j + 2], scale0, results[4 * j + 2]);
      results[4 * j + 3] = fmaf(accumulators[4 * j + 3], scale1, results[4 * j + 3]);
    }
    __syncwarp();  // every lane's scale reads come before lane 0 releases the stage for the warp
    if (lane == 0) mbarrier_arrive(&empty[stage]);  // the wgmmas have read the tiles, the scales are read
    position.advance();
  }
  return position;
}

// Launched with kThreads threads, kSharedBytes of dynamic shared memory, in clusters of 1 to kDecodeMaxSplits CTAs
// along x (the K splits of one tile); gridDim.x = tiles * cluster size. a_map: a's [groups * m, k] in boxes of 128 x
// 64; b_map: b's [groups * n, k] in boxes of 128 x 128.
template <bool kMasked>
__global__ void __launch_bounds__(kThreads, kDecodeCtasPerSm)
    fp8_gemm_decode_kernel(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap b_map,
                           const Arguments args) {
  extern __shared__ uint8_t shared_raw[];
  uint8_t* ring = shared_raw + ((1024 - (smem_address(shared_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + kStages * kStageBytes);  // [kStages] stage landed
  uint64_t* empty = full + kStages;                                            // [kStages] stage released

  // Launched to overlap the kernel before it (programmatic dependent launch), a thread reads nothing that kernel
  // may write before grid_dependency_wait: masked_m here at once, the tokens and their scales in the producer after
  // it has asked for the first stages' weights.
  if constexpr (kMasked) grid_dependency_wait();
  const int splits = static_cast<int>(cluster_cta_count()), rank = static_cast<int>(cluster_cta_rank());
  TileTask task = locate<kMasked>(args, blockIdx.x / splits, rank, splits);
  if (task.token_row >= task.token_end) return;  // the whole cluster leaves: its first tile has no tokens

  const int thread = threadIdx.x;
  if (thread == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1 + 32);  // the TMA bytes' arrival, then one cp.async arrival per producer lane
      mbarrier_init(&empty[s], 8);      // lane 0 of each consumer warp
    }
    fence_barrier_init();
    prefetch_tensor_map(&a_map);
    prefetch_tensor_map(&b_map);
  }
  __syncthreads();

  // broadcast from lane 0 so that the compiler sees the warpgroup warp-uniform (no divergence around wgmmas)
  const int wg = __shfl_sync(0xFFFFFFFFu, thread / 128, 0);
  const int lane = thread % 32;
  const uint32_t partial_address = smem_address(ring);
  RingPosition<kStages> position;
  int prefilled = 0;  // the producer's first fills whose weight part is issued already
  if (wg == 2) {
    if constexpr (!kMasked) {  // the weights of the first stages of the fresh ring, then the wait
      prefilled = min(kStages, task.block_end - task.block_begin);
      if (lane == 0) {
        for (int i = 0; i < prefilled; ++i) {
          load_weights(&b_map, args, task, ring + i * kStageBytes, &full[i], task.block_begin + i);
        }
      }
      grid_dependency_wait();
    }
  }
  // the cluster's tiles of tokens, token_tile_stride apart; the same count for every thread of the cluster
  for (; task.token_row < task.token_end; task.token_row += args.token_tile_stride * kTokens) {
    if (wg == 2) {
      position = produce(&a_map, &b_map, args, task, ring, full, empty, position, prefilled);
      prefilled = 0;
      __syncwarp();  // the warp reconverges before the cluster barrier
    } else {
      float results[32];
      position = consume(task, ring, full, empty, wg, position, results);
      named_barrier(1, kConsumerThreads);  // both warpgroups' wgmmas are done with the ring
      fence_proxy_async();                 // generic stores into memory the async proxy (TMA, wgmma) last accessed
      auto* partial = reinterpret_cast<float*>(ring);
      const int row0 = 64 * wg + 16 * ((thread % 128) / 32) + lane / 4;
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int row = row0 + ((i & 2) ? 8 : 0), token = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
        partial[token * kPartialStride + row] = results[i];
      }
      fence_proxy_async();  // ... before the next tile's copies overwrite them
    }
    cluster_sync();  // every split's partial results are in its shared memory

    // This CTA's slice of the tile's rows (four at a time) summed over the splits in rank order, stored in bf16.
    if (wg < 2) {
      const int slice = ((kWeightRows + splits - 1) / splits + 3) / 4 * 4;  // rows, a multiple of 4 (16-byte loads)
      const int row_begin = rank * slice, quads = max(min(slice, kWeightRows - row_begin), 0) / 4;
      for (int item = thread; item < quads * kTokens; item += kConsumerThreads) {
        const int row = row_begin + 4 * (item % quads), token = item / quads;
        const int out_row = task.token_row + token, column = task.n_tile * kWeightRows + row;
        if (out_row >= task.token_end || column >= args.n) continue;
        const uint32_t address = partial_address + 4 * (token * kPartialStride + row);
        float4 sum = load_shared_cluster_f32x4(address, 0);
        for (int cta = 1; cta < splits; ++cta) {
          const float4 part = load_shared_cluster_f32x4(address, cta);
          sum.x += part.x;
          sum.y += part.y;
          sum.z += part.z;
          sum.w += part.w;
        }
        auto* out = reinterpret_cast<__nv_bfloat162*>(args.out + static_cast<int64_t>(out_row) * args.n + column);
        out[0] = __floats2bfloat162_rn(sum.x, sum.y);
        out[1] = __floats2bfloat162_rn(sum.z, sum.w);
      }
    }
    cluster_sync();  // no CTA leaves, or refills its ring, while a peer may still read its partial results
  }
}

}  // namespace dsv3::cuda::fp8_gemm_decode
