// MLA decode's attention step (cpu/mla_attend.h) on AMX tiles (tdpbf16ps). Per 64-token page, for each tile of 16
// query rows:
//   Scores, transposed: Sᵀ [64 tokens, 16 rows] = K · Qᵀ. K is the "A" operand straight from a bf16 cache page
//     ([64 tokens][576] row-major; a tile is 16 tokens x 32 dims) and Qᵀ the "B" operand, re-laid once per split as
//     pairs of dims, q_pairs[row tile][288][16 rows]. An FP8 page is first decoded into such a bf16 page (the codes
//     only: e4m3 is exact in bf16); each 128-dim latent group and the rope part then sum in tiles of their own, and
//     the groups are scaled per token and added in fp32, as in the GPU kernel.
//   Online softmax with one vector lane per query row, over the page's tokens.
//   P·V: O [16 rows, dv] = P [16 rows, 64 tokens] · V [64 tokens, dv], added to the rescaled accumulator. P, rounded to
//     bf16 as on the GPU, is the "A" operand (the score tile transposed back in 16 x 16 blocks), V the "B" operand,
//     re-laid as pairs of tokens, v_pairs[32][64], one 64-dim block at a time for every row tile. With an FP8 cache a
//     value's scale belongs to its token, the summed side of this product, so it moves onto P: the columns of latent
//     group g use bf16(P * scale_g(token)).
// Tokens of a page past the sequence's end get zero weight and zero value rows, whatever their cache rows hold.

#include "cpu/mla_attend.h"

#if defined(DSV3_MLA_AMX)

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/e4m3_avx512.h"
#include "cpu/simd_avx512.h"

namespace dsv3::cpu {
namespace {

constexpr int kTile = amx::kTileRows;              // query rows per row tile, tokens per token tile
constexpr int kTokenTiles = kMlaPageSize / kTile;  // 4
constexpr int kSteps = kMlaHeadDim / 32;           // tile steps of 32 dims over a key
constexpr int kGroupDims = 128;                    // FP8 cache: dims per scale
constexpr int kGroups = kMlaLatentDim / kGroupDims;
constexpr int kGroupSteps = kGroupDims / 32;
constexpr int kDimBlock = 4 * kTile;  // value dims per P·V pass: four C tiles
// Rows of the re-laid values and of a pass's output: 16 elements more than a block, so that the 16 rows a tile
// touches do not share L1 sets.
constexpr int kPairsStride = kDimBlock + kTile;
constexpr int kTokenPairs = kMlaPageSize / 2;
constexpr int kPSteps = kMlaPageSize / 32;  // tile steps of 32 tokens over a page
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
T* grown(std::vector<T>& buffer, size_t count) {
  if (buffer.size() < count) buffer.resize(count);
  return buffer.data();
}

// Per-thread scratch, grown as needed and reused across splits and calls.
struct Scratch {
  std::vector<uint32_t> q_pairs;  // [row tiles][kMlaHeadDim / 2][16]: (q[r, 2i], q[r, 2i + 1]) for the tile's rows r
  std::vector<uint16_t> page;     // FP8 cache: [64][576] bf16, the page's codes decoded and its rope copied
  std::vector<float> scales;      // FP8 cache: [64][4] the page's group scales
  std::vector<uint32_t> v_pairs;  // [32][kPairsStride]: (v[2t, d], v[2t + 1, d]) for one block of value dims
  std::vector<float> scores;      // [64 tokens][16 rows]: Sᵀ, then the softmax weights
  std::vector<uint16_t> p;        // [row tiles][kGroups or 1][kPSteps][16 rows][32 tokens] bf16: the P·V "A" tiles
  std::vector<float> factors;     // [row tiles][16]: each row's accumulator rescale for this page
  std::vector<float> o;           // [16 rows][kPairsStride]: P·V of one row tile and block of value dims
  std::vector<float> c;           // FP8 scores: [kGroups + 1][16 tokens][16 rows]
};

// Row tile t of q_pairs from rows [16 t, 16 t + 16) of the sequence's queries (zeros past `rows`).
void relayout_queries(const uint16_t* q, int64_t rows, int64_t tile, uint32_t* pairs) {
  for (int d0 = 0; d0 < kMlaHeadDim; d0 += 32) {
    __m512i v[kTile];
    for (int l = 0; l < kTile; ++l) {
      const int64_t r = tile * kTile + l;
      v[l] = r < rows ? _mm512_loadu_si512(q + r * kMlaHeadDim + d0) : _mm512_setzero_si512();
    }
    avx512::transpose_16x16_epi32(v);  // v[i]: pair d0 / 2 + i of the 16 rows
    for (int i = 0; i < kTile; ++i) _mm512_storeu_si512(pairs + (d0 / 2 + i) * kTile, v[i]);
  }
}

// The page's FP8 rows as bf16 [64][576] (latent codes decoded in order, rope copied) and their scales.
void decode_fp8_page(const uint8_t* rows, const avx512::E4m3Decoder& decoder, uint16_t* page, float* scales) {
  for (int t = 0; t < kMlaPageSize; ++t) {
    const uint8_t* row = rows + t * kMlaFp8RowBytes;
    uint16_t* dst = page + t * kMlaHeadDim;
    for (int d = 0; d < kMlaLatentDim; d += 64) {
      __m512i first, second;
      decoder.decode_in_order(_mm512_loadu_si512(row + d), first, second);
      _mm512_storeu_si512(dst + d, first);
      _mm512_storeu_si512(dst + d + 32, second);
    }
    std::memcpy(scales + t * kGroups, row + kMlaLatentDim, kGroups * sizeof(float));
    std::memcpy(dst + kMlaLatentDim, row + kMlaLatentDim + kGroups * sizeof(float), kMlaRopeDim * sizeof(uint16_t));
  }
}

// v_pairs[t / 2][d] = (v[t, d0 + d], v[t + 1, d0 + d]) for the kDimBlock dims from d0, rows past `tokens` zero;
// rows of v are kMlaHeadDim bf16 apart, rows of v_pairs kPairsStride pairs.
void relayout_values(const uint16_t* v, int tokens, int d0, uint32_t* pairs) {
  // word 2i of the result takes word i of the first row, word 2i + 1 word i of the second
  const __m512i lower = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,  //
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i upper = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,  //
                                         55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int tp = 0; tp < kTokenPairs; ++tp) {
    const uint16_t* even = v + (2 * tp) * kMlaHeadDim + d0;
    const uint16_t* odd = even + kMlaHeadDim;
    const bool has_even = 2 * tp < tokens, has_odd = 2 * tp + 1 < tokens;
    uint32_t* dst = pairs + tp * kPairsStride;
    for (int d = 0; d < kDimBlock; d += 32) {
      const __m512i a = has_even ? _mm512_loadu_si512(even + d) : _mm512_setzero_si512();
      const __m512i b = has_odd ? _mm512_loadu_si512(odd + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + d, _mm512_permutex2var_epi16(a, lower, b));
      _mm512_storeu_si512(dst + d + 16, _mm512_permutex2var_epi16(a, upper, b));
    }
  }
}

// scores[token][row] = K · Qᵀ for the 64 tokens of a bf16 page and one row tile (tiles 0-3: the token tiles' sums,
// 4: q pairs, 5-7: keys).
void page_scores_bf16(const uint16_t* page, const uint32_t* q_pairs, float* scores) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  constexpr int kRowBytes = kMlaHeadDim * 2;
  for (int s = 0; s < kSteps; ++s) {
    _tile_loadd(4, q_pairs + s * kTile * kTile, 64);
    const uint16_t* keys = page + s * 32;
    _tile_loadd(5, keys, kRowBytes);
    _tile_dpbf16ps(0, 5, 4);
    _tile_loadd(6, keys + kTile * kMlaHeadDim, kRowBytes);
    _tile_dpbf16ps(1, 6, 4);
    _tile_loadd(7, keys + 2 * kTile * kMlaHeadDim, kRowBytes);
    _tile_dpbf16ps(2, 7, 4);
    _tile_loadd(5, keys + 3 * kTile * kMlaHeadDim, kRowBytes);
    _tile_dpbf16ps(3, 5, 4);
  }
  _tile_stored(0, scores, 64);
  _tile_stored(1, scores + kTile * kTile, 64);
  _tile_stored(2, scores + 2 * kTile * kTile, 64);
  _tile_stored(3, scores + 3 * kTile * kTile, 64);
}

// The same for a decoded FP8 page: per token tile, latent groups in tiles 0-3 and rope in tile 4, then
// scores = sum_g scale_g(token) * group g + rope, in fp32.
void page_scores_fp8(const uint16_t* page, const float* page_scales, const uint32_t* q_pairs, float* c, float* scores) {
  for (int tt = 0; tt < kTokenTiles; ++tt) {
    const uint16_t* keys = page + tt * kTile * kMlaHeadDim;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_zero(4);
    const auto load = [&](int s) {  // tile 5: the keys' dims [32 s, 32 s + 32), tile 6: the queries'
      _tile_loadd(5, keys + s * 32, kMlaHeadDim * 2);
      _tile_loadd(6, q_pairs + s * kTile * kTile, 64);
    };
    // (the tile operands of _tile_dpbf16ps must be literals)
    for (int s = 0; s < kGroupSteps; ++s) {
      load(s);
      _tile_dpbf16ps(0, 5, 6);
    }
    for (int s = kGroupSteps; s < 2 * kGroupSteps; ++s) {
      load(s);
      _tile_dpbf16ps(1, 5, 6);
    }
    for (int s = 2 * kGroupSteps; s < 3 * kGroupSteps; ++s) {
      load(s);
      _tile_dpbf16ps(2, 5, 6);
    }
    for (int s = 3 * kGroupSteps; s < kGroups * kGroupSteps; ++s) {
      load(s);
      _tile_dpbf16ps(3, 5, 6);
    }
    for (int s = kGroups * kGroupSteps; s < kSteps; ++s) {
      load(s);
      _tile_dpbf16ps(4, 5, 6);
    }
    _tile_stored(0, c, 64);
    _tile_stored(1, c + kTile * kTile, 64);
    _tile_stored(2, c + 2 * kTile * kTile, 64);
    _tile_stored(3, c + 3 * kTile * kTile, 64);
    _tile_stored(4, c + 4 * kTile * kTile, 64);
    for (int i = 0; i < kTile; ++i) {
      const float* scale = page_scales + (tt * kTile + i) * kGroups;
      __m512 sum = _mm512_mul_ps(_mm512_set1_ps(scale[0]), _mm512_loadu_ps(c + i * kTile));
      for (int g = 1; g < kGroups; ++g) {
        sum = _mm512_add_ps(sum, _mm512_mul_ps(_mm512_set1_ps(scale[g]), _mm512_loadu_ps(c + (g * kTile + i) * kTile)));
      }
      sum = _mm512_add_ps(sum, _mm512_loadu_ps(c + (kGroups * kTile + i) * kTile));
      _mm512_storeu_ps(scores + (tt * kTile + i) * kTile, sum);
    }
  }
}

// The softmax weights of one row tile (scores [64][16] in, weights out: zero past `tokens` and for rows that see
// nothing here), with the online state of the tile's rows updated; returns each row's accumulator rescale factor.
// visible: per row, how many of the page's tokens it may see; valid: the rows that exist.
__m512 softmax_page(float* scores, int tokens, __m512i visible, __mmask16 valid, float scale, float* running_max,
                    float* running_sum) {
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  __m512 block_max = neg_inf;
  for (int j = 0; j < tokens; ++j) {
    const __mmask16 sees = _mm512_cmpgt_epi32_mask(visible, _mm512_set1_epi32(j));
    const __m512 s =
        _mm512_mask_mov_ps(neg_inf, sees, _mm512_mul_ps(_mm512_loadu_ps(scores + j * kTile), _mm512_set1_ps(scale)));
    _mm512_storeu_ps(scores + j * kTile, s);
    block_max = _mm512_mask_mov_ps(block_max, _mm512_cmp_ps_mask(block_max, s, _CMP_LT_OQ), s);  // std::max
  }
  const __mmask16 active = _mm512_cmp_ps_mask(block_max, neg_inf, _CMP_NEQ_OQ) & valid;
  const __m512 old_max = _mm512_mask_loadu_ps(neg_inf, valid, running_max);
  const __m512 new_max = _mm512_mask_mov_ps(old_max, _mm512_cmp_ps_mask(old_max, block_max, _CMP_LT_OQ), block_max);
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < tokens; ++j) {
    const __m512 e =
        _mm512_maskz_mov_ps(active, avx512::exp(_mm512_sub_ps(_mm512_loadu_ps(scores + j * kTile), new_max)));
    _mm512_storeu_ps(scores + j * kTile, e);
    sum = _mm512_add_ps(sum, e);
  }
  for (int j = tokens; j < kMlaPageSize; ++j) _mm512_storeu_ps(scores + j * kTile, _mm512_setzero_ps());
  const __m512 rescale = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), active, avx512::exp(_mm512_sub_ps(old_max, new_max)));
  const __m512 old_sum = _mm512_mask_loadu_ps(_mm512_setzero_ps(), valid, running_sum);
  _mm512_mask_storeu_ps(running_sum, active, _mm512_add_ps(_mm512_mul_ps(old_sum, rescale), sum));
  _mm512_mask_storeu_ps(running_max, active, new_max);
  return rescale;
}

// The P·V "A" tiles, [kPSteps][16 rows][32 tokens] bf16, from the weights [64 tokens][16 rows], each token's weight
// times token_scale[token * stride] when token_scale is given (tokens past `tokens`, whose weights are zero, are not
// scaled: their scales are whatever the cache holds).
void weights_to_tiles(const float* weights, int tokens, const float* token_scale, int stride, uint16_t* tiles) {
  for (int step = 0; step < kPSteps; ++step) {
    __m512i rows[kTile];
    for (int i = 0; i < kTile; ++i) {  // token pair 16 step + i, as 16 rows of (even, odd) bf16 pairs
      const int t = 2 * (kTile * step + i);
      __m512 even = _mm512_loadu_ps(weights + t * kTile), odd = _mm512_loadu_ps(weights + (t + 1) * kTile);
      if (token_scale && t < tokens) even = _mm512_mul_ps(even, _mm512_set1_ps(token_scale[t * stride]));
      if (token_scale && t + 1 < tokens) odd = _mm512_mul_ps(odd, _mm512_set1_ps(token_scale[(t + 1) * stride]));
      rows[i] = avx512::to_bf16_pairs(even, odd);
    }
    avx512::transpose_16x16_epi32(rows);  // rows[r]: row r's 16 token pairs
    for (int r = 0; r < kTile; ++r) _mm512_storeu_si512(tiles + (step * kTile + r) * 32, rows[r]);
  }
}

// o [16 rows][kDimBlock] (rows kPairsStride floats apart) = P · V over the page for one block of value dims (tile
// 4: P, 5-7: value pairs, 0-3: the block's four 16-dim column tiles).
void block_values(const uint16_t* p, const uint32_t* v_pairs, float* o) {
  constexpr int kRowBytes = kPairsStride * 4;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int step = 0; step < kPSteps; ++step) {
    _tile_loadd(4, p + step * kTile * 32, 64);
    const uint32_t* v = v_pairs + step * kTile * kPairsStride;
    _tile_loadd(5, v, kRowBytes);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, v + kTile, kRowBytes);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(7, v + 2 * kTile, kRowBytes);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, v + 3 * kTile, kRowBytes);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, o, kRowBytes);
  _tile_stored(1, o + kTile, kRowBytes);
  _tile_stored(2, o + 2 * kTile, kRowBytes);
  _tile_stored(3, o + 3 * kTile, kRowBytes);
}

}  // namespace

void mla_attend_amx(const MlaDecodeParams& p, int64_t seq, int32_t first_block, int32_t last_block,
                    const MlaSplitState& state) {
  const int64_t rows = p.s_q * p.heads, dv = p.head_dim_v;
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  const int32_t seqlen = p.cache_seqlens[seq];
  const int p_variants = p.fp8_cache ? kGroups : 1;
  const int p_tile_elements = kPSteps * kTile * 32;  // one set of P·V "A" tiles

  thread_local Scratch scratch;
  uint32_t* q_pairs = grown(scratch.q_pairs, row_tiles * (kMlaHeadDim / 2) * kTile);
  uint16_t* decoded = p.fp8_cache ? grown(scratch.page, kMlaPageSize * kMlaHeadDim) : nullptr;
  float* page_scales = p.fp8_cache ? grown(scratch.scales, kMlaPageSize * kGroups) : nullptr;
  uint32_t* v_pairs = grown(scratch.v_pairs, kTokenPairs * kPairsStride);
  float* scores = grown(scratch.scores, kMlaPageSize * kTile);
  uint16_t* p_tiles = grown(scratch.p, row_tiles * p_variants * p_tile_elements);
  float* factors = grown(scratch.factors, row_tiles * kTile);
  float* o = grown(scratch.o, kTile * kPairsStride);
  float* c = grown(scratch.c, (kGroups + 1) * kTile * kTile);

  const uint16_t* q_seq = p.q + seq * rows * kMlaHeadDim;
  for (int64_t t = 0; t < row_tiles; ++t) relayout_queries(q_seq, rows, t, q_pairs + t * (kMlaHeadDim / 2) * kTile);
  const avx512::E4m3Decoder decoder;
  const amx::TileScope tiles;

  for (int32_t block = first_block; block < last_block; ++block) {
    const int32_t page_id = p.block_table[seq * p.max_blocks + block];
    const int tokens = std::min(kMlaPageSize, seqlen - block * kMlaPageSize);
    const uint16_t* page;
    if (p.fp8_cache) {
      decode_fp8_page(p.kv_cache + int64_t{page_id} * kMlaPageSize * kMlaFp8RowBytes, decoder, decoded, page_scales);
      page = decoded;
    } else {
      page = reinterpret_cast<const uint16_t*>(p.kv_cache) + int64_t{page_id} * kMlaPageSize * kMlaHeadDim;
    }

    // Scores and softmax weights of every row tile.
    for (int64_t t = 0; t < row_tiles; ++t) {
      const uint32_t* tile_q = q_pairs + t * (kMlaHeadDim / 2) * kTile;
      if (p.fp8_cache)
        page_scores_fp8(page, page_scales, tile_q, c, scores);
      else
        page_scores_bf16(page, tile_q, scores);

      // Row r (query token r / heads, at position seqlen - s_q + r / heads) sees keys up to its own when causal.
      alignas(64) int32_t visible[kTile];
      for (int l = 0; l < kTile; ++l) {
        const int64_t r = t * kTile + l;
        const int64_t end = p.causal ? seqlen - p.s_q + r / p.heads + 1 - int64_t{block} * kMlaPageSize : tokens;
        visible[l] = static_cast<int32_t>(std::max<int64_t>(std::min<int64_t>(end, tokens), 0));
      }
      const int64_t valid_rows = std::min<int64_t>(kTile, rows - t * kTile);
      const __mmask16 valid = static_cast<__mmask16>((1u << valid_rows) - 1);
      _mm512_storeu_ps(factors + t * kTile,
                       softmax_page(scores, tokens, _mm512_load_si512(visible), valid, p.softmax_scale,
                                    state.running_max + t * kTile, state.running_sum + t * kTile));
      for (int g = 0; g < p_variants; ++g) {
        weights_to_tiles(scores, tokens, p.fp8_cache ? page_scales + g : nullptr, kGroups,
                         p_tiles + (t * p_variants + g) * p_tile_elements);
      }
    }

    // P·V block by block of value dims, each block's re-laid values serving every row tile from L1.
    for (int d0 = 0; d0 < dv; d0 += kDimBlock) {
      relayout_values(page, tokens, d0, v_pairs);
      const int group = p.fp8_cache ? d0 / kGroupDims : 0;
      const int64_t width = std::min<int64_t>(kDimBlock, dv - d0);
      for (int64_t t = 0; t < row_tiles; ++t) {
        block_values(p_tiles + (t * p_variants + group) * p_tile_elements, v_pairs, o);
        const int64_t valid_rows = std::min<int64_t>(kTile, rows - t * kTile);
        for (int64_t l = 0; l < valid_rows; ++l) {
          float* acc = state.acc + (t * kTile + l) * dv + d0;
          const float* block_out = o + l * kPairsStride;
          const __m512 factor = _mm512_set1_ps(factors[t * kTile + l]);
          for (int64_t d = 0; d < width; d += 16) {
            const __mmask16 m = width - d >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (width - d)) - 1);
            const __m512 updated = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, acc + d), factor),
                                                 _mm512_maskz_loadu_ps(m, block_out + d));
            _mm512_mask_storeu_ps(acc + d, m, updated);
          }
        }
      }
    }
  }
}

}  // namespace dsv3::cpu

#endif
