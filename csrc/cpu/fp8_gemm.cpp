// FP8 block-scaled GEMM on the CPU: out[m, n] = sum over 128-wide K groups g of
//   (sum_{k in g} qa[m, k] * qb[n, k]) * sa[m, g] * sb[n / 128, g]
// with the raw e4m3 products accumulated in fp32 per group and then "promoted" into an fp32 accumulator, the same
// schedule as the GPU kernels. e4m3 values are exact in bf16, so with AVX-512 BF16 the group sums are vdpbf16ps dot
// products; elsewhere a portable fp32 loop the compiler vectorizes.
//
// Two kernels. From two rows of a on, where the CPU has AMX, tile dot products (tdpbf16ps) with the weight as the
// row-major operand (see the amx section). Otherwise, register-blocked micro-tiles of kMicroRows rows of a by
// kMicroCols rows of b, each vector lane a partial dot product (vdpbf16ps, or the portable loop), which for a single
// row of a streams the weight once at the decoder's speed. Both decode a once per call into a shared buffer and the
// weight one K group at a time, right before its use (into L1, or straight into registers). Decoded rows are padded
// with zeros to a multiple of 64 values (kChunk), so every K group holds whole vectors and a partial last group (K %
// 128 != 0) adds only 0 * 0 products. Threads take tiles of work dynamically.
//
// fp8_gemm_batch runs several independent GEMMs (a MoE layer's experts) as one: every GEMM picks its kernel by its own
// row count, the activation pass and the product pass each share one thread team across all of them, and a GEMM may
// gather its rows of a through an index list while decoding them, or quantize them from unquantized activations
// (fp8_linear). fp8_gemm_nt is a batch of one.
//
// Promotion and non-finite values: a group sum is scaled by sa * sb, fused into the accumulation (one FMA), when that
// product is finite; otherwise as (sum * sa) * sb, so a zero sum stays zero when huge finite scales overflow their
// product, as in the reference, which scales each product. A NaN code (0x7F / 0xFF) decodes to NaN and poisons its
// group sum, and NaN scales poison the promoted sum, so NaN lands where the reference puts it. An infinite scale,
// which the quantizers only produce together with a NaN code in its group, gives inf * sum where the reference may
// see inf * 0 = NaN per product.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/fp8_gemm_batch.h"
#include "cpu/fp8_rows.h"
#include "cpu/scratch.h"
#include "dsv3/fp8.h"
#include "dsv3/half_types.h"

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define DSV3_GEMM_AVX512 1
#include <immintrin.h>

#include "cpu/amx.h"
#include "cpu/e4m3_avx512.h"
#include "cpu/simd_avx512.h"
#if defined(DSV3_CPU_AMX)
#define DSV3_GEMM_AMX 1
#endif
#endif

namespace dsv3::cpu {
namespace {

constexpr int64_t kChunk = 64;        // values decoded together; rows are padded to a multiple of this
constexpr int64_t kRowsPerTile = 64;  // rows of a per tile of the micro-tile kernel (a unit of work for a thread)
constexpr int64_t kColsPerTile = 16;  // rows of b per tile: small enough that a decode-sized GEMM has many tiles
constexpr int kMicroRows = 4;         // micro-tile: rows of a ...
constexpr int kMicroCols = 4;         // ... times rows of b, whose dot products share every load

int64_t padded_k(int64_t k) { return (k + kChunk - 1) / kChunk * kChunk; }

// A job with unquantized activations: group g (128 channels) of row r of x as e4m3 codes, returning its scale
// (per_token_group_quant_fp8's arithmetic).
float quantize_group(const Fp8GemmJob& job, int64_t r, int64_t g, uint8_t* codes) {
  float scale = 0.0f;
  dispatch_float_type(job.x_dtype, [&](auto type) {
    constexpr DType kType = decltype(type)::value;
    const auto* x = static_cast<const typename Element<kType>::Storage*>(job.x) + r * job.gemm.k + g * kScaleBlock;
    scale = scale_from_amax(group_amax<kType>(x, kScaleBlock), false);
    quantize_row<kType>(x, codes, kScaleBlock, scale);
  });
  return scale;
}

// 64-byte aligned scratch for decoded rows.
template <typename T>
struct AlignedBuffer {
  struct Free {
    void operator()(T* p) const { ::operator delete(p, std::align_val_t{64}); }
  };
  std::unique_ptr<T, Free> data;
  explicit AlignedBuffer(int64_t count)
      : data(static_cast<T*>(::operator new(sizeof(T) * std::max<int64_t>(count, 1), std::align_val_t{64}))) {}
  T* get() const { return data.get(); }
};

#if defined(DSV3_GEMM_AVX512)

// ---- AVX-512 BF16 --------------------------------------------------------------------------------------------------
// a and b are decoded alike (avx512::E4m3Decoder::decode, lane-interleaved order), so their pairs line up and the dot
// products are unchanged by the permutation.
//
// The kernels read the weight one K group (128 bytes) of several rows at a time, too many short streams for the
// hardware prefetcher; they ask for the lines kPrefetchGroups groups ahead of each row themselves.
constexpr int64_t kPrefetchGroups = 1;
inline void prefetch_group(const uint8_t* row, int64_t k, int64_t g) {
  const int64_t ahead = (g + kPrefetchGroups) * kScaleBlock;
  if (ahead < k) _mm_prefetch(reinterpret_cast<const char*>(row + ahead), _MM_HINT_T0);
  if (ahead + 64 < k) _mm_prefetch(reinterpret_cast<const char*>(row + ahead + 64), _MM_HINT_T0);
}

struct Bf16Kernel {
  using Element = uint16_t;  // bf16 bits

  struct Decoder : avx512::E4m3Decoder {
    // The codes of a chunk: all 64, or the first `count` (< 64) and zeros. Callers keep the two apart, so that whole
    // chunks (all but a row's last when K % 64 != 0) take a plain load: building the mask for every chunk cost as
    // much scalar work as decoding it.
    static __m512i load(const uint8_t* src) { return _mm512_loadu_si512(src); }
    static __m512i load(const uint8_t* src, int64_t count) {
      return _mm512_maskz_loadu_epi8((__mmask64{1} << count) - 1, src);
    }
    // `count` codes into padded_k(count) values at dst (64-byte aligned), zero-filled past count.
    void row(const uint8_t* src, int64_t count, Element* dst) const {
      __m512i first, second;
      int64_t c = 0;
      for (; c + kChunk <= count; c += kChunk) {
        decode(load(src + c), first, second);
        _mm512_store_si512(dst + c, first);
        _mm512_store_si512(dst + c + 32, second);
      }
      if (c < count) {
        decode(load(src + c, count - c), first, second);
        _mm512_store_si512(dst + c, first);
        _mm512_store_si512(dst + c + 32, second);
      }
    }
  };

  // out[i, j] = sum over K groups g of dot(a row i, b row j over g) * sa[i, g] * sb_rows[j][g]. Each 64 codes of b
  // are decoded into registers and used at once by all kRows rows of a.
  template <int kRows, int kCols>
  static void micro_tile(const Decoder& decoder, const Element* a, int64_t lda, const float* sa, int64_t groups,
                         const uint8_t* b, int64_t k, const float* const* sb_rows, uint16_t* out, int64_t ldo) {
    __m512 acc[kRows][kCols];
    for (int i = 0; i < kRows; ++i)
      for (int j = 0; j < kCols; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * kScaleBlock, k1 = std::min(k, k0 + kScaleBlock);
      __m512 part[kRows][kCols];
      for (int i = 0; i < kRows; ++i)
        for (int j = 0; j < kCols; ++j) part[i][j] = _mm512_setzero_ps();
      for (int j = 0; j < kCols; ++j) prefetch_group(b + j * k, k, g);
      // kRows x kCols independent accumulation chains per chunk; `load` reads a row's codes of the chunk.
      const auto chunk_products = [&](int64_t c, auto load) {
        for (int j = 0; j < kCols; ++j) {
          __m512i first, second;
          decoder.decode(load(b + j * k + c), first, second);
          for (int i = 0; i < kRows; ++i) {
            const Element* a_chunk = a + i * lda + c;
            part[i][j] = _mm512_dpbf16_ps(part[i][j], (__m512bh)_mm512_load_si512(a_chunk), (__m512bh)first);
            part[i][j] = _mm512_dpbf16_ps(part[i][j], (__m512bh)_mm512_load_si512(a_chunk + 32), (__m512bh)second);
          }
        }
      };
      int64_t c = k0;
      for (; c + kChunk <= k1; c += kChunk) chunk_products(c, [](const uint8_t* src) { return Decoder::load(src); });
      if (c < k1) chunk_products(c, [tail = k1 - c](const uint8_t* src) { return Decoder::load(src, tail); });
      for (int i = 0; i < kRows; ++i) {
        for (int j = 0; j < kCols; ++j) {
          const float row_scale = sa[i * groups + g], tile_scale = sb_rows[j][g], scale = row_scale * tile_scale;
          if (std::isfinite(scale)) {
            acc[i][j] = _mm512_fmadd_ps(part[i][j], _mm512_set1_ps(scale), acc[i][j]);
          } else {
            const __m512 scaled =
                _mm512_mul_ps(_mm512_mul_ps(part[i][j], _mm512_set1_ps(row_scale)), _mm512_set1_ps(tile_scale));
            acc[i][j] = _mm512_add_ps(acc[i][j], scaled);
          }
        }
      }
    }
    for (int i = 0; i < kRows; ++i)
      for (int j = 0; j < kCols; ++j) out[i * ldo + j] = float_to_bf16(avx512::horizontal_sum(acc[i][j]));
  }
};

using Kernel = Bf16Kernel;

#else

// ---- Portable ------------------------------------------------------------------------------------------------------
// Rows decode to fp32 in natural order; each group sum runs in 16 independent lanes (a fixed order the compiler can
// vectorize without reassociating), then the lanes are added and promoted.
struct PortableKernel {
  using Element = float;
  static constexpr int kLanes = 16;

  struct Decoder {
    // `count` codes into padded_k(count) values at dst, zero-filled past count.
    void row(const uint8_t* src, int64_t count, Element* dst) const {
      for (int64_t i = 0; i < padded_k(count); ++i) dst[i] = i < count ? e4m3_to_float(src[i]) : 0.0f;
    }
  };

  template <int kRows, int kCols>
  static void micro_tile(const Decoder& decoder, const Element* a, int64_t lda, const float* sa, int64_t groups,
                         const uint8_t* b, int64_t k, const float* const* sb_rows, uint16_t* out, int64_t ldo) {
    Element slice[kCols][kScaleBlock];
    float acc[kRows][kCols] = {};
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * kScaleBlock, k1 = std::min(k, k0 + kScaleBlock);
      for (int j = 0; j < kCols; ++j) decoder.row(b + j * k + k0, k1 - k0, slice[j]);
      const int64_t length = padded_k(k1 - k0);
      for (int i = 0; i < kRows; ++i) {
        const Element* a_group = a + i * lda + k0;
        for (int j = 0; j < kCols; ++j) {
          float lanes[kLanes] = {};
          for (int64_t kk = 0; kk < length; kk += kLanes)
            for (int l = 0; l < kLanes; ++l) lanes[l] += a_group[kk + l] * slice[j][kk + l];
          float part = 0.0f;
          for (int l = 0; l < kLanes; ++l) part += lanes[l];
          acc[i][j] += part * sa[i * groups + g] * sb_rows[j][g];
        }
      }
    }
    for (int i = 0; i < kRows; ++i)
      for (int j = 0; j < kCols; ++j) out[i * ldo + j] = float_to_bf16(acc[i][j]);
  }
};

using Kernel = PortableKernel;

#endif

using Decoded = Kernel::Element;  // a decoded value

#if defined(DSV3_GEMM_AMX)

// ---- AMX (tdpbf16ps) -----------------------------------------------------------------------------------------------
// From kMinRows rows of a on, the group sums come from AMX tile dot products. The weight is the tiles' "A" operand:
// a tile is 16 rows of b by 32 decoded values, exactly b's row-major layout, so the weight needs no transpose. The
// activations are the "B" operand, which pairs consecutive K values of 16 rows: a is re-laid once per call as
//   a_pairs[m / 16][k / 2][m % 16] = (a[m, k], a[m, k + 1])   (bf16 pairs, in the decoder's lane order, zero-padded)
// so each C tile holds out^T for 16 rows of b x 16 rows of a. A slice is kCols rows of b (two tiles, one weight scale
// tile since 128 is a multiple of 32); a unit of work is one slice, or kWideSlices adjacent ones, by up to kRows rows
// of a. Per K group it decodes each slice of b into L1 (prefetching the next group), runs 2x2 tile products per pair
// of row tiles of a, and promotes the four C tiles into an fp32 accumulator.
//
// The re-laid rows of a are read once per slice and K group. Where a block of them outgrows the share of L2 it can
// keep beside the weight stream, every slice would fetch them from L3 again; a wide unit instead runs its slices over
// kChunkGroups K groups at a time, so those groups' rows of a come from L3 once and serve all of its slices from L2,
// while each slice's accumulator stays in L1 for the whole chunk.
namespace amx_kernel {

// From two rows of a on. For a single row the dot-product kernel is as fast and needs no re-layout of a.
constexpr int64_t kMinRows = 2;

constexpr int64_t kTile = amx::kTileRows;  // rows per tile and rows of a per C tile column block
constexpr int64_t kCols = 2 * kTile;       // rows of b per slice
constexpr int64_t kRows = 256;             // rows of a per unit: the b slice decoded per group serves all of them
constexpr int64_t kWideSlices = 8;         // slices of a wide unit
constexpr int64_t kChunkGroups = 8;        // K groups a wide unit's slices take in turn
constexpr int64_t kMinWideUnits = 16;      // wide units of a GEMM, at least: enough to share between threads
constexpr int64_t kL2PanelBytes = int64_t{1} << 20;  // re-laid rows of a that a one-slice unit may read from L2
constexpr int64_t kPairsPerGroup = kScaleBlock / 2;

// c[t] (16 rows of b x 16 rows of a) += slice of b (tile) . a_pairs (tile) over one K group of `steps` x 32 values.
// kTwo: whether a second row tile of a exists (tiles 2-3); b_slice holds kCols rows of 128 decoded values. Tiles 0-3
// accumulate C, 4-5 hold b, 6-7 hold a_pairs.
template <bool kTwo>
void group_products(const uint16_t* b_slice, const uint32_t* pairs0, const uint32_t* pairs1, int64_t steps, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  if (kTwo) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, b_slice + s * 32, kScaleBlock * 2);
    _tile_loadd(5, b_slice + kTile * kScaleBlock + s * 32, kScaleBlock * 2);
    _tile_loadd(6, pairs0 + s * kTile * kTile, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if (kTwo) {
      _tile_loadd(7, pairs1 + s * kTile * kTile, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + kTile * kTile, 64);
  if (kTwo) {
    _tile_stored(2, c + 2 * kTile * kTile, 64);
    _tile_stored(3, c + 3 * kTile * kTile, 64);
  }
}

// acc[i] (row i of b, 16 rows of a) += (c[i] * sa) * sb for one row tile of a. c holds the sums of products with the
// weight decoded 2^8 times too large (avx512::E4m3Times256Decoder); scaling them back first is exact, so the result
// is bit for bit that of the unscaled weight.
void promote(const float* c_lower, const float* c_upper, const float* sa, float sb, float* acc) {
  const __m512 unscale = _mm512_set1_ps(avx512::E4m3Times256Decoder::kUnscale);
  const __m512 row_scales = _mm512_loadu_ps(sa);
  const __m512 tile_scale = _mm512_set1_ps(sb);
  const __m512 scales = _mm512_mul_ps(row_scales, tile_scale);
  constexpr int kNonFinite = 0x01 | 0x08 | 0x10 | 0x80;  // fpclass: quiet NaN, +inf, -inf, signaling NaN
  const bool fused = _mm512_fpclass_ps_mask(scales, kNonFinite) == 0;
  for (int64_t i = 0; i < kCols; ++i) {
    const __m512 c =
        _mm512_mul_ps(_mm512_load_ps(i < kTile ? c_lower + i * kTile : c_upper + (i - kTile) * kTile), unscale);
    const __m512 sum = _mm512_load_ps(acc + i * kTile);
    _mm512_store_ps(acc + i * kTile, fused
                                         ? _mm512_fmadd_ps(c, scales, sum)
                                         : _mm512_add_ps(sum, _mm512_mul_ps(_mm512_mul_ps(c, row_scales), tile_scale)));
  }
}

int64_t row_tiles(int64_t m) { return (m + kTile - 1) / kTile; }

// Scratch of one GEMM's re-laid activations (see above): a_pairs [row tiles][kp / 2][16] bf16 pairs and the scales
// transposed per row tile, sa_t [row tiles][groups][16], both zero-padded past m.
int64_t pair_words(int64_t m, int64_t k) { return row_tiles(m) * (padded_k(k) / 2) * kTile; }
int64_t scale_words(int64_t m, int64_t k) { return row_tiles(m) * scale_blocks(k) * kTile; }

// Item (row tile, K group) of the re-layout of job's a. Each item writes whole cache lines of both outputs, so no two
// items share a line.
void relayout_a(const Fp8GemmJob& job, int64_t item, uint32_t* a_pairs, float* sa_t,
                const Bf16Kernel::Decoder& decoder) {
  const Fp8GemmParams& p = job.gemm;
  const int64_t kp = padded_k(p.k), groups = scale_blocks(p.k);
  const int64_t tile = item / groups, g = item % groups;
  const int64_t k0 = g * kScaleBlock, k1 = std::min(p.k, k0 + kScaleBlock);
  const int64_t pairs = (std::min(kp, k0 + kScaleBlock) - k0) / 2;
  uint32_t* dst = a_pairs + (tile * (kp / 2) + g * kPairsPerGroup) * kTile;
  float* scales = sa_t + (tile * groups + g) * kTile;
  alignas(64) uint16_t values[kTile][kScaleBlock];  // the group's 16 rows of a, decoded (zeros past m)
  for (int64_t lane = 0; lane < kTile; ++lane) {
    const int64_t r = tile * kTile + lane;
    if (r >= p.m) {
      std::fill(values[lane], values[lane] + 2 * pairs, uint16_t{0});
      scales[lane] = 0.0f;
    } else if (job.x) {
      alignas(64) uint8_t codes[kScaleBlock];
      scales[lane] = quantize_group(job, r, g, codes);
      decoder.row(codes, kScaleBlock, values[lane]);
    } else {
      const int64_t src = job.a_rows ? job.a_rows[r] : r;
      decoder.row(p.a + src * p.k + k0, k1 - k0, values[lane]);
      scales[lane] = p.a_scales[src * groups + g];
    }
  }
  // Row lane's pair q goes to dst[q][lane]: 16 x 16 transposes of the pairs as 32-bit elements.
  for (int64_t q0 = 0; q0 < pairs; q0 += kTile) {
    __m512i block[kTile];
    for (int64_t lane = 0; lane < kTile; ++lane) block[lane] = _mm512_load_si512(values[lane] + 2 * q0);
    avx512::transpose_16x16_epi32(block);
    for (int64_t q = 0; q < kTile; ++q) _mm512_store_si512(dst + (q0 + q) * kTile, block[q]);
  }
}

// What a thread keeps across its units: the tile configuration and L1-sized buffers (the accumulator, L2-sized).
struct ThreadState {
  amx::TileScope tiles;
  avx512::E4m3Times256Decoder weight_decoder;
  AlignedBuffer<uint16_t> b_slice{kCols * kScaleBlock};  // [row of b][128]: one K group, decoded (times 2^8)
  AlignedBuffer<float> c{4 * kTile * kTile};
  AlignedBuffer<float> acc{kWideSlices * (kRows / kTile) * kCols * kTile};  // [slice][row tile][row of b][16 rows]
};

int64_t row_blocks(int64_t m) { return (m + kRows - 1) / kRows; }

// Slices of b per unit of a GEMM: wide where a block of re-laid rows of a exceeds kL2PanelBytes and the GEMM still
// has kMinWideUnits units. (Measured on a 2-core Xeon at N = 4096, K = 7168: 1.1x at M = 128, 1.2-1.3x at M = 512.)
int64_t unit_slices(int64_t m, int64_t n, int64_t k) {
  const int64_t block_rows = row_tiles(std::min(m, kRows)) * kTile;
  const bool wide = block_rows * padded_k(k) * 2 > kL2PanelBytes &&
                    row_blocks(m) * ((n + kWideSlices * kCols - 1) / (kWideSlices * kCols)) >= kMinWideUnits;
  return wide ? kWideSlices : 1;
}

int64_t col_units(int64_t m, int64_t n, int64_t k) {
  const int64_t cols = unit_slices(m, n, k) * kCols;
  return (n + cols - 1) / cols;
}
int64_t units(int64_t m, int64_t n, int64_t k) { return row_blocks(m) * col_units(m, n, k); }

// Unit `unit` (row-block-major) of a GEMM whose a was re-laid into a_pairs / sa_t.
void run_unit(const Fp8GemmParams& p, const uint32_t* a_pairs, const float* sa_t, int64_t unit, ThreadState& state) {
  const int64_t kp = padded_k(p.k), groups = scale_blocks(p.k);
  const int64_t m0 = (unit / col_units(p.m, p.n, p.k)) * kRows, m1 = std::min(p.m, m0 + kRows);
  const int64_t unit_cols = unit_slices(p.m, p.n, p.k) * kCols;
  const int64_t n0 = (unit % col_units(p.m, p.n, p.k)) * unit_cols, n1 = std::min(p.n, n0 + unit_cols);
  const int64_t slices = (n1 - n0 + kCols - 1) / kCols;
  const int64_t tile0 = m0 / kTile, tiles = (m1 - m0 + kTile - 1) / kTile;
  const int64_t slice_acc = tiles * kCols * kTile;  // accumulator floats of one slice
  float* acc = state.acc.get();
  uint16_t* b_slice = state.b_slice.get();
  float* c = state.c.get();
  std::fill(acc, acc + slices * slice_acc, 0.0f);
  for (int64_t chunk = 0; chunk < groups; chunk += kChunkGroups) {
    for (int64_t s = 0; s < slices; ++s) {
      const int64_t s0 = n0 + s * kCols, s1 = std::min(n1, s0 + kCols);
      std::fill(b_slice + (s1 - s0) * kScaleBlock, b_slice + kCols * kScaleBlock, uint16_t{0});  // rows past n
      float* slice_acc0 = acc + s * slice_acc;
      for (int64_t g = chunk; g < std::min(groups, chunk + kChunkGroups); ++g) {
        const int64_t k0 = g * kScaleBlock, k1 = std::min(p.k, k0 + kScaleBlock);
        const int64_t steps = (std::min(kp, k0 + kScaleBlock) - k0) / 32;
        // The group's slice of b is kCols short pieces of rows K bytes apart, too many streams for the hardware
        // prefetcher: fetch each row's next piece as this one is decoded. (Asking for all kCols rows' lines at once
        // stalled on the core's line fill buffers.)
        for (int64_t n = s0; n < s1; ++n) {
          prefetch_group(p.b + n * p.k, p.k, g);
          state.weight_decoder.group(p.b + n * p.k + k0, k1 - k0, b_slice + (n - s0) * kScaleBlock);
        }
        const float sb = p.b_scales[(s0 / kScaleBlock) * groups + g];
        for (int64_t t = 0; t < tiles; t += 2) {
          const uint32_t* pairs0 = a_pairs + ((tile0 + t) * (kp / 2) + g * kPairsPerGroup) * kTile;
          const float* sa0 = sa_t + ((tile0 + t) * groups + g) * kTile;
          float* acc0 = slice_acc0 + t * kCols * kTile;
          if (t + 1 < tiles) {
            group_products<true>(b_slice, pairs0, pairs0 + (kp / 2) * kTile, steps, c);
            promote(c, c + kTile * kTile, sa0, sb, acc0);
            promote(c + 2 * kTile * kTile, c + 3 * kTile * kTile, sa0 + groups * kTile, sb, acc0 + kCols * kTile);
          } else {
            group_products<false>(b_slice, pairs0, nullptr, steps, c);
            promote(c, c + kTile * kTile, sa0, sb, acc0);
          }
        }
      }
    }
  }
  // Each 16-float row of acc is one output column of a row tile. Rounded to bf16, columns 2j and 2j + 1 side by side
  // make one 32-bit lane per row of a, and a 16 x 16 transpose of those vectors gives the tile's output rows.
  static_assert(kCols == 2 * kTile, "one 16 x 16 transpose of column pairs per row tile");
  for (int64_t s = 0; s < slices; ++s) {
    const int64_t s0 = n0 + s * kCols, s1 = std::min(n1, s0 + kCols);
    const __mmask32 columns = s1 - s0 >= kCols ? ~__mmask32{0} : (__mmask32{1} << (s1 - s0)) - 1;
    for (int64_t t = 0; t < tiles; ++t) {
      const float* acc_t = acc + s * slice_acc + t * kCols * kTile;  // columns past n hold zeros
      __m512i pairs[kTile];
      for (int64_t j = 0; j < kTile; ++j) {
        pairs[j] =
            avx512::to_bf16_pairs(_mm512_load_ps(acc_t + 2 * j * kTile), _mm512_load_ps(acc_t + (2 * j + 1) * kTile));
      }
      avx512::transpose_16x16_epi32(pairs);  // pairs[i]: the 32 bf16 outputs of row i
      const int64_t first_row = m0 + t * kTile, rows = std::min(kTile, m1 - first_row);
      for (int64_t i = 0; i < rows; ++i)
        _mm512_mask_storeu_epi16(p.out + (first_row + i) * p.n + s0, columns, pairs[i]);
    }
  }
}

}  // namespace amx_kernel

#endif

using MicroTileFn = void (*)(const Kernel::Decoder&, const Decoded*, int64_t, const float*, int64_t, const uint8_t*,
                             int64_t, const float* const*, uint16_t*, int64_t);

// micro-tile kernels for every (rows, cols) in [1, kMicroRows] x [1, kMicroCols], for the edges of a tile.
template <int... kRows, int... kCols>
constexpr auto micro_tile_table(std::integer_sequence<int, kRows...>, std::integer_sequence<int, kCols...> cols) {
  auto row = [](auto rows, std::integer_sequence<int, kCols...>) {
    return std::array<MicroTileFn, kMicroCols>{&Kernel::micro_tile<decltype(rows)::value, kCols + 1>...};
  };
  return std::array<std::array<MicroTileFn, kMicroCols>, kMicroRows>{
      row(std::integral_constant<int, kRows + 1>{}, cols)...};
}

const auto kMicroTiles =
    micro_tile_table(std::make_integer_sequence<int, kMicroRows>{}, std::make_integer_sequence<int, kMicroCols>{});

namespace micro {

// Scratch of one GEMM: a decoded once, [m, kp] (tiny next to the weight for decode-sized m and reused by every
// column tile), and its scales gathered, [m, groups].
int64_t a_elements(int64_t m, int64_t k) { return m * padded_k(k); }
int64_t scale_words(int64_t m, int64_t k) { return m * scale_blocks(k); }

void decode_a_row(const Fp8GemmJob& job, int64_t r, Decoded* a, float* sa, const Kernel::Decoder& decoder) {
  const Fp8GemmParams& p = job.gemm;
  const int64_t groups = scale_blocks(p.k);
  if (job.x) {  // k is a multiple of 128 (validated), so every group is whole
    for (int64_t g = 0; g < groups; ++g) {
      alignas(64) uint8_t codes[kScaleBlock];
      sa[r * groups + g] = quantize_group(job, r, g, codes);
      decoder.row(codes, kScaleBlock, a + r * padded_k(p.k) + g * kScaleBlock);
    }
    return;
  }
  const int64_t src = job.a_rows ? job.a_rows[r] : r;
  decoder.row(p.a + src * p.k, p.k, a + r * padded_k(p.k));
  std::copy(p.a_scales + src * groups, p.a_scales + (src + 1) * groups, sa + r * groups);
}

int64_t col_tiles(int64_t n) { return (n + kColsPerTile - 1) / kColsPerTile; }
int64_t units(int64_t m, int64_t n) { return (m + kRowsPerTile - 1) / kRowsPerTile * col_tiles(n); }

// Tiles are numbered row-tile-major, so consecutive tiles share one block of a.
void run_unit(const Fp8GemmParams& p, const Decoded* a, const float* sa, int64_t tile, const Kernel::Decoder& decoder) {
  const int64_t kp = padded_k(p.k), groups = scale_blocks(p.k);
  const int64_t m0 = (tile / col_tiles(p.n)) * kRowsPerTile, m1 = std::min(p.m, m0 + kRowsPerTile);
  const int64_t n0 = (tile % col_tiles(p.n)) * kColsPerTile, n1 = std::min(p.n, n0 + kColsPerTile);
  for (int64_t j0 = n0; j0 < n1; j0 += kMicroCols) {
    const int cols = static_cast<int>(std::min<int64_t>(kMicroCols, n1 - j0));
    const float* sb_rows[kMicroCols];
    for (int j = 0; j < cols; ++j) sb_rows[j] = p.b_scales + ((j0 + j) / kScaleBlock) * groups;
    for (int64_t i0 = m0; i0 < m1; i0 += kMicroRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kMicroRows, m1 - i0));
      kMicroTiles[rows - 1][cols - 1](decoder, a + i0 * kp, kp, sa + i0 * groups, groups, p.b + j0 * p.k, p.k, sb_rows,
                                      p.out + i0 * p.n + j0, p.n);
    }
  }
}

}  // namespace micro

bool amx_enabled() {
#if defined(DSV3_GEMM_AMX)
  return amx::enabled();
#else
  return false;
#endif
}

// How one job of a batch runs: its kernel, its share of the scratch and its ranges of the batch's work items.
struct JobPlan {
  bool amx = false;          // AMX tiles (from amx_kernel::kMinRows rows on), else the micro-tile kernel
  int64_t a_offset = 0;      // bytes into the activation scratch (64-byte aligned)
  int64_t scale_offset = 0;  // floats into the scale scratch (16-float aligned)
  int64_t first_prep = 0;    // first item of the activation pass: AMX (row tile, K group), micro-tile rows
  int64_t first_unit = 0;    // first item of the product pass
};

int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// Index of the job whose range [first, next job's first) holds item.
template <typename First>
int64_t job_of(const std::vector<JobPlan>& plans, int64_t item, First first) {
  const auto it = std::upper_bound(plans.begin(), plans.end(), item,
                                   [&](int64_t value, const JobPlan& plan) { return value < first(plan); });
  return static_cast<int64_t>(it - plans.begin()) - 1;
}

}  // namespace

void fp8_gemm_batch(const Fp8GemmJob* jobs, int64_t count) {
  const Kernel::Decoder decoder;
  [[maybe_unused]] const bool use_amx = amx_enabled();
  std::vector<JobPlan> plans(count);
  int64_t a_bytes = 0, scale_floats = 0, prep_items = 0, unit_items = 0;
  for (int64_t j = 0; j < count; ++j) {
    const Fp8GemmParams& p = jobs[j].gemm;
    if (jobs[j].x)
      validate(Fp8LinearParams{jobs[j].x, jobs[j].x_dtype, p.b, p.b_scales, p.out, p.m, p.n, p.k});
    else
      validate(p);
    JobPlan& plan = plans[j];
    plan.a_offset = a_bytes;
    plan.scale_offset = scale_floats;
    plan.first_prep = prep_items;
    plan.first_unit = unit_items;
    if (p.m == 0 || p.n == 0) continue;  // K = 0 writes zeros: every group loop is empty
#if defined(DSV3_GEMM_AMX)
    plan.amx = p.m >= amx_kernel::kMinRows && use_amx;
    if (plan.amx) {
      a_bytes += align64(amx_kernel::pair_words(p.m, p.k) * 4);
      scale_floats += align64(amx_kernel::scale_words(p.m, p.k) * 4) / 4;
      prep_items += amx_kernel::row_tiles(p.m) * scale_blocks(p.k);
      unit_items += amx_kernel::units(p.m, p.n, p.k);
      continue;
    }
#endif
    a_bytes += align64(micro::a_elements(p.m, p.k) * static_cast<int64_t>(sizeof(Decoded)));
    scale_floats += align64(micro::scale_words(p.m, p.k) * 4) / 4;
    prep_items += p.m;
    unit_items += micro::units(p.m, p.n);
  }
  if (unit_items == 0) return;
  ScratchArray<std::byte> a_scratch(ScratchSlot::kGemmA, a_bytes);
  ScratchArray<float> scale_scratch(ScratchSlot::kGemmScales, scale_floats);
  const auto a_of = [&](const JobPlan& plan) { return a_scratch.get() + plan.a_offset; };
  const auto scales_of = [&](const JobPlan& plan) { return scale_scratch.get() + plan.scale_offset; };

  // One thread team for both passes (a fork and join less per batch). Both hand out work dynamically: on a shared
  // machine a descheduled thread would otherwise hold back its whole static share.
#pragma omp parallel
  {
    // Pass 1: decode (and for AMX re-lay) every job's activations, gathering rows through a_rows.
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < prep_items; ++item) {
      const int64_t j = job_of(plans, item, [](const JobPlan& plan) { return plan.first_prep; });
      const JobPlan& plan = plans[j];
#if defined(DSV3_GEMM_AMX)
      if (plan.amx) {
        amx_kernel::relayout_a(jobs[j], item - plan.first_prep, reinterpret_cast<uint32_t*>(a_of(plan)),
                               scales_of(plan), decoder);
        continue;
      }
#endif
      micro::decode_a_row(jobs[j], item - plan.first_prep, reinterpret_cast<Decoded*>(a_of(plan)), scales_of(plan),
                          decoder);
    }
    // (the implied barrier: every unit reads activations another thread may have decoded)

    // Pass 2: the products.
#if defined(DSV3_GEMM_AMX)
    std::unique_ptr<amx_kernel::ThreadState> state;  // created by a thread's first AMX unit
#endif
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < unit_items; ++item) {
      const int64_t j = job_of(plans, item, [](const JobPlan& plan) { return plan.first_unit; });
      const JobPlan& plan = plans[j];
#if defined(DSV3_GEMM_AMX)
      if (plan.amx) {
        if (!state) state = std::make_unique<amx_kernel::ThreadState>();
        amx_kernel::run_unit(jobs[j].gemm, reinterpret_cast<const uint32_t*>(a_of(plan)), scales_of(plan),
                             item - plan.first_unit, *state);
        continue;
      }
#endif
      micro::run_unit(jobs[j].gemm, reinterpret_cast<const Decoded*>(a_of(plan)), scales_of(plan),
                      item - plan.first_unit, decoder);
    }
  }
}

void fp8_gemm_nt(const Fp8GemmParams& params) {
  const Fp8GemmJob job{params, nullptr};
  fp8_gemm_batch(&job, 1);
}

}  // namespace dsv3::cpu
