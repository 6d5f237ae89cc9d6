#pragma once
// Hand-written sm_90a FP8 block-scaled GEMM, out[m, n] = (a * a_scales) @ (b * b_scales)^T in bf16: 128 x 128
// output tiles over a persistent grid, one producer thread filling a ring of kStages (a, b) tile pairs by TMA, and
// two consumer warpgroups of 64 rows each running FP8 wgmma (m64n128k32) and promoting every 128-deep K block's
// partial sums into fp32 results with a_scales * b_scales, as the CUTLASS blockwise kernels do.
//
// What is different: a consumer keeps two sets of MMA accumulators and queues block j + 1's wgmmas before it waits
// for block j's, so block j's promotion (and the ring slot's release) overlaps block j + 1 on the tensor cores. The
// CUTLASS kernels wait for every block's wgmmas to drain before promoting, which leaves the tensor cores idle for the
// promotion of each block in turn (both consumer warpgroups promote at the same time).
//
// With kCluster = 2 the CTAs run in pairs along N (clusters of two taking tiles (m, 2j) and (m, 2j + 1)): each CTA
// loads one half of their shared 128-row tile of a and multicasts it into both, so a CTA reads 24 KB instead of
// 32 KB from the L2 per K block (at 80% of the FP8 peak, 128 x 128 tiles alone would pull ~12 TB/s from the L2). A
// ring slot is then refilled only once the consumers of both CTAs have released it.
//
// Grouped (MoE experts, DeepGEMM's m-grouped semantics): the tile rows are laid out group after group, each group's
// rows of a (a run of a [m_sum, k], or the first masked_m[g] rows of slab g) cut into 128-row tiles multiplied by
// b[g]; a setup kernel lists them on the device (Arguments::group_tiles). A tile's rows past its group's end belong
// to the next group or to no group: they are computed and not stored.
//
// Edges: TMA zero-fills the parts of a tile past M, N or K; boxes start inside the tensors, scale loads are clamped
// to existing rows and the stores to the tile's rows and columns < N, so nothing outside the operands is read or
// written. Needs K % 16 == 0 (TMA row pitch) and N % 2 == 0 (column pairs are stored together).

#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/sm90_ptx.cuh"

namespace dsv3::cuda::fp8_gemm_overlap {

using namespace sm90;

constexpr int kTile = 128;                    // rows of a (tokens) and of b (weight rows) per tile, and K per block
constexpr int kStages = 6;                    // (a, b) tile pairs in flight
constexpr int kOperandBytes = kTile * kTile;  // one e4m3 128 x 128 tile
constexpr int kStageBytes = 2 * kOperandBytes;
constexpr int kThreads = 384;  // warpgroup 0: the producer (one thread); 1 and 2: the consumers
constexpr int kSharedBytes = kStages * kStageBytes + 2 * kStages * 8 + 1024;  // ring, barriers, alignment slack
constexpr int kGroupTilesM = 8;  // tiles run in bands of 8 tile rows, all N tiles of a band in turn
constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;
// The consumers' registers come from the producer's: the kernel starts at 65536 / 384 (168, a multiple of 8) a
// thread, which the binary test checks, and the hand-over must not ask for more than that frees.
static_assert(kThreads * (65536 / kThreads / 8 * 8) >= 128 * (kProducerRegisters + 2 * kConsumerRegisters),
              "setmaxnreg budget");

struct Arguments {
  const float* a_scales;  // [m, k_blocks]
  const float* b_scales;  // [groups * n_tiles, k_blocks]
  uint16_t* out;          // [m, n] bf16
  int m;                  // rows of a (grouped: m_sum, or groups * m_max)
  int n, k_blocks, n_tiles;
  int n_units;  // ceil(n_tiles / kCluster): a cluster's CTAs take the kCluster tiles of a unit, side by side along N
  int m_tiles;  // dense: tile rows (grouped: group_tiles[groups], read on the device)
  // grouped only (null when dense)
  const int32_t* group_tiles;  // [groups + 1]: tile rows before each group's (exclusive prefix sum), then the total
  const int32_t* first_row;    // [groups]: each group's first row of a
  const int32_t* rows;         // [groups]: each group's rows
  int groups;
};

// What a CTA computes for one unit: out rows [a_row, row_end) ∩ this tile's 128, columns of tile n_tile.
struct TileTask {
  int a_row;       // first row of the tile in a and out
  int row_end;     // rows at and past it are not stored (the group's end, or M)
  int b_row;       // first row of the tile of b in its [groups * n, k] view (a box starting inside it)
  int n_tile;      // column tile; n_tiles or more for the phantom second CTA of an odd count (nothing stored)
  int scale_tile;  // its row of b_scales, clamped to the group's last column tile
};

// D[64 x 128] (+)= A[64 x 32] * B[32 x 128], e4m3 inputs from 128-byte-swizzled K-major shared memory, fp32
// accumulators (the fragment layout of sm90's wgmma .m64nNk16 D, N = 128: 64 per thread).
__device__ __forceinline__ void wgmma_64x128x32_e4m3(float (&d)[64], uint64_t a, uint64_t b, uint32_t accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, "
      "%11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, "
      "%31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, "
      "%51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(accumulate));
}

// Unit index -> (tile row, unit column): bands of kGroupTilesM tile rows, column-major inside a band, so the units
// running at once share few distinct rows of a and of b (their K blocks are read from HBM once, then from the L2).
__device__ __forceinline__ void unit_coordinates(int unit, const Arguments& args, int m_tiles, int& m_tile,
                                                 int& n_unit) {
  const int band = unit / (kGroupTilesM * args.n_units);
  const int first = band * kGroupTilesM;
  const int rows = min(m_tiles - first, kGroupTilesM);
  const int local = unit - band * kGroupTilesM * args.n_units;
  m_tile = first + local % rows;
  n_unit = local / rows;
}

// The tile row `m_tile` of a grouped GEMM: its group is the last one whose tiles start at or before it.
__device__ __forceinline__ int group_of_tile(const Arguments& args, int m_tile) {
  int low = 0, high = args.groups - 1;
  while (low < high) {
    const int middle = (low + high + 1) / 2;
    if (__ldg(args.group_tiles + middle) <= m_tile) {
      low = middle;
    } else {
      high = middle - 1;
    }
  }
  return low;
}

template <int kCluster, bool kGrouped>
__device__ __forceinline__ TileTask locate(const Arguments& args, int m_tiles, int unit, int rank) {
  int m_tile, n_unit;
  unit_coordinates(unit, args, m_tiles, m_tile, n_unit);
  TileTask task;
  task.n_tile = n_unit * kCluster + rank;
  const int column_tile = min(task.n_tile, args.n_tiles - 1);
  if constexpr (kGrouped) {
    const int group = group_of_tile(args, m_tile);
    const int first = __ldg(args.first_row + group);
    task.a_row = first + (m_tile - __ldg(args.group_tiles + group)) * kTile;
    task.row_end = first + __ldg(args.rows + group);
    task.b_row = group * args.n + column_tile * kTile;
    task.scale_tile = group * args.n_tiles + column_tile;
  } else {
    task.a_row = m_tile * kTile;
    task.row_end = args.m;
    task.b_row = column_tile * kTile;
    task.scale_tile = column_tile;
  }
  return task;
}

// The scales of one K block for a thread's two accumulator rows, loaded when the block's wgmmas are issued and
// multiplied when its partial sums are promoted (by then the loads have long arrived).
struct BlockScales {
  float row0, row1, column;
};

// Issues one K block: four k32 wgmmas into `accumulators` (the first overwrites them) as one commit group.
__device__ __forceinline__ void issue_block(float (&accumulators)[64], uint32_t a_address, uint32_t b_address) {
  const uint64_t a = sw128_descriptor(a_address, 16, 1024);
  const uint64_t b = sw128_descriptor(b_address, 16, 1024);
  wgmma_fence();
  static_for<kTile / 32>([&](auto kk) {
    constexpr uint32_t kOffset = decltype(kk)::value * 32;
    wgmma_64x128x32_e4m3(accumulators, advance_descriptor<kOffset>(a), advance_descriptor<kOffset>(b),
                         decltype(kk)::value > 0 ? 1u : 0u);
  });
  wgmma_commit();
}

// Waits until at most kPending commit groups (the block issued after this one) are in flight, frees the block's ring
// slot (one arrival per warp, on that slot in every CTA of the cluster: each of them holds part of this CTA's tile of
// a) and adds the block's partial sums times its scales into the results.
template <int kCluster, int kPending>
__device__ __forceinline__ void retire_block(float (&accumulators)[64], float (&results)[64], const BlockScales& scales,
                                             uint64_t* empty, int lane, int rank) {
  wgmma_wait<kPending>();
  fence_registers(accumulators);
  if (lane == 0) {
    mbarrier_arrive(empty);
#pragma unroll
    for (int cta = 0; cta < kCluster; ++cta) {
      if (cta != rank) mbarrier_arrive_cluster(empty, cta);
    }
  }
  const float scale0 = scales.row0 * scales.column, scale1 = scales.row1 * scales.column;
#pragma unroll
  for (int i = 0; i < 64; ++i) results[i] = fmaf(accumulators[i], (i & 2) ? scale1 : scale0, results[i]);
}

// One thread fills the ring: per K block, this CTA's tile of b and its tile of a (with clusters, its share of the
// tile of a, multicast into every CTA of the cluster; a_map's boxes are then kTile / kCluster rows).
template <int kCluster, bool kGrouped>
__device__ __forceinline__ void produce(const CUtensorMap* a_map, const CUtensorMap* b_map, const Arguments& args,
                                        int m_tiles, uint8_t* ring, uint64_t* full, uint64_t* empty, int rank,
                                        int first_unit, int unit_stride) {
  constexpr int kShareRows = kTile / kCluster;
  RingPosition<kStages> position;
  for (int unit = first_unit; unit < m_tiles * args.n_units; unit += unit_stride) {
    const TileTask task = locate<kCluster, kGrouped>(args, m_tiles, unit, rank);
    // a share of a past M (the last tile row's second half, M % 128 <= 64) starts at row M - 1 instead: a box
    // entirely outside the tensor is not asked for; the rows are never stored
    const int a_row = min(task.a_row + rank * kShareRows, args.m - 1);
    for (int block = 0; block < args.k_blocks; ++block) {
      const int stage = position.stage;
      mbarrier_wait(&empty[stage], position.phase ^ 1);  // a fresh barrier passes parity 1 at once
      uint8_t* slot = ring + stage * kStageBytes;
      mbarrier_arrive_expect_tx(&full[stage], kStageBytes);
      if constexpr (kCluster == 1) {
        tma_load_2d(slot, a_map, block * kTile, a_row, &full[stage]);
      } else {
        tma_load_2d_multicast(slot + rank * kShareRows * kTile, a_map, block * kTile, a_row, &full[stage],
                              (1u << kCluster) - 1);
      }
      tma_load_2d(slot + kOperandBytes, b_map, block * kTile, task.b_row, &full[stage]);
      position.advance();
    }
  }
}

// Consumer warpgroup wg (1 or 2) computes rows 64 * (wg - 1) .. + 63 of every tile of this CTA.
template <int kCluster, bool kGrouped>
__device__ __forceinline__ void consume(const Arguments& args, int m_tiles, uint8_t* ring, uint64_t* full,
                                        uint64_t* empty, int wg, int rank, int first_unit, int unit_stride) {
  const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32;
  const int tile_row = (wg - 1) * 64 + 16 * warp + lane / 4;  // this thread's accumulator rows: tile_row, tile_row + 8
  const uint32_t ring_address = smem_address(ring);
  const uint32_t a_offset = (wg - 1) * 64 * kTile;  // this warpgroup's 64 rows of the a tile
  RingPosition<kStages> position;

  float results[64], first[64], second[64];
  for (int unit = first_unit; unit < m_tiles * args.n_units; unit += unit_stride) {
    const TileTask task = locate<kCluster, kGrouped>(args, m_tiles, unit, rank);
    const int row0 = task.a_row + tile_row;
    // rows past the tile's end read its last row's scales (their results are never stored)
    const float* row0_scales = args.a_scales + static_cast<int64_t>(min(row0, task.row_end - 1)) * args.k_blocks;
    const float* row1_scales = args.a_scales + static_cast<int64_t>(min(row0 + 8, task.row_end - 1)) * args.k_blocks;
    const float* column_scales = args.b_scales + static_cast<int64_t>(task.scale_tile) * args.k_blocks;
#pragma unroll
    for (int i = 0; i < 64; ++i) results[i] = 0.0f;

    // Loads block `block`'s scales, waits for its tiles and issues its wgmmas into `accumulators`; returns its stage.
    auto issue = [&](int block, float (&accumulators)[64], BlockScales& scales) {
      scales = {__ldg(row0_scales + block), __ldg(row1_scales + block), __ldg(column_scales + block)};
      const int stage = position.stage;
      mbarrier_wait(&full[stage], position.phase);
      const uint32_t slot = ring_address + stage * kStageBytes;
      issue_block(accumulators, slot + a_offset, slot + kOperandBytes);
      position.advance();
      return stage;
    };

    BlockScales first_scales, second_scales;
    int previous_stage = issue(0, first, first_scales);
    int block = 1;
    for (; block + 1 < args.k_blocks; block += 2) {
      int stage = issue(block, second, second_scales);
      retire_block<kCluster, 1>(first, results, first_scales, &empty[previous_stage], lane, rank);
      previous_stage = stage;
      stage = issue(block + 1, first, first_scales);
      retire_block<kCluster, 1>(second, results, second_scales, &empty[previous_stage], lane, rank);
      previous_stage = stage;
    }
    if (block < args.k_blocks) {  // an even number of blocks: the last one goes to the second set
      const int stage = issue(block, second, second_scales);
      retire_block<kCluster, 1>(first, results, first_scales, &empty[previous_stage], lane, rank);
      retire_block<kCluster, 0>(second, results, second_scales, &empty[stage], lane, rank);
    } else {
      retire_block<kCluster, 0>(first, results, first_scales, &empty[previous_stage], lane, rank);
    }

    // bf16 results straight from registers: thread (warp, lane) holds columns 8 * (i / 4) + 2 * (lane % 4) + {0, 1}
    // of rows row0 (i % 4 < 2) and row0 + 8
    const int column0 = task.n_tile * kTile + 2 * (lane % 4);
#pragma unroll
    for (int i = 0; i < 64; i += 2) {
      const int row = row0 + ((i & 2) ? 8 : 0), column = column0 + 8 * (i / 4);
      if (row < task.row_end && column < args.n) {
        *reinterpret_cast<__nv_bfloat162*>(args.out + static_cast<int64_t>(row) * args.n + column) =
            __floats2bfloat162_rn(results[i], results[i + 1]);
      }
    }
  }
}

// Launched with kThreads threads, kSharedBytes of dynamic shared memory and, for kCluster > 1, clusters of kCluster
// CTAs along x (gridDim.x a multiple of kCluster). a_map: a as [m, k]; b_map: b as [groups * n, k].
template <int kCluster, bool kGrouped>
__global__ void __launch_bounds__(kThreads, 1)
    fp8_gemm_overlap_kernel(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap b_map,
                            const Arguments args) {
  static_assert(kCluster == 1 || kCluster == 2, "CTAs run alone or in pairs along N");
  extern __shared__ uint8_t shared_raw[];
  uint8_t* ring = shared_raw + ((1024 - (smem_address(shared_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + kStages * kStageBytes);  // [kStages] tiles landed
  uint64_t* empty = full + kStages;  // [kStages] slot released by the consumers of every CTA of the cluster

  const int thread = threadIdx.x;
  // broadcast from lane 0 so that the compiler sees the warpgroup warp-uniform (no divergence around wgmmas)
  const int wg = __shfl_sync(0xFFFFFFFFu, thread / 128, 0);
  const int rank = kCluster == 1 ? 0 : static_cast<int>(cluster_cta_rank());
  const int first_unit = blockIdx.x / kCluster, unit_stride = gridDim.x / kCluster;
  const int m_tiles = kGrouped ? __ldg(args.group_tiles + args.groups) : args.m_tiles;

  if (thread == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], 8 * kCluster);  // lane 0 of each consumer warp of the cluster
    }
    fence_barrier_init();
    prefetch_tensor_map(&a_map);
    prefetch_tensor_map(&b_map);
  }
  if constexpr (kCluster == 1) {
    __syncthreads();
  } else {
    cluster_sync();  // the peers' barriers exist before any multicast or remote arrival reaches them
  }

  if (wg == 0) {
    set_max_registers_dec<kProducerRegisters>();
    if (thread == 0) {
      produce<kCluster, kGrouped>(&a_map, &b_map, args, m_tiles, ring, full, empty, rank, first_unit, unit_stride);
    }
  } else {
    set_max_registers_inc<kConsumerRegisters>();
    consume<kCluster, kGrouped>(args, m_tiles, ring, full, empty, wg, rank, first_unit, unit_stride);
  }
  if constexpr (kCluster > 1) cluster_sync();  // no CTA leaves while a peer may still arrive on its barriers
}

}  // namespace dsv3::cuda::fp8_gemm_overlap
