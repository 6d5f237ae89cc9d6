// MLA decode on the CPU over a paged latent cache (bf16 or 656-byte FP8 rows): the split-KV partition of
// dsv3/mla_schedule.h (the one the GPU uses), one OpenMP task per part, online softmax in fp32 per 64-token block,
// then the combine step for sequences cut into several splits.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/mla_attend.h"
#if defined(__AVX512F__)
#include "cpu/simd_avx512.h"
#endif
#include "dsv3/fp8.h"
#include "dsv3/half_types.h"

namespace dsv3::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

int32_t seqlen_of(const MlaDecodeParams& p, int64_t seq) { return p.cache_seqlens[seq]; }

// Everything a part may dereference is checked before any work starts: sequence lengths against the block table,
// used page ids against the cache, and the schedule (it arrives from the caller) against the batch and workspace.
void check_inputs(const MlaDecodeParams& p) {
  for (int64_t seq = 0; seq < p.batch; ++seq) {
    const int32_t seqlen = seqlen_of(p, seq);
    DSV3_CHECK(seqlen >= 0 && seqlen <= p.max_blocks * kMlaPageSize, "cache_seqlens[", seq, "]=", seqlen,
               ": expected 0..", p.max_blocks * kMlaPageSize, " (block_table has ", p.max_blocks, " pages a row)");
    for (int32_t block = 0; block < mla_blocks(seqlen); ++block) {
      const int32_t page = p.block_table[seq * p.max_blocks + block];
      DSV3_CHECK(page >= 0 && page < p.num_blocks, "block_table[", seq, ", ", block, "]=", page,
                 ": page id outside the cache's ", p.num_blocks, " blocks");
    }
  }
  const int64_t max_splits = mla_max_splits(p.batch, p.num_parts);
  DSV3_CHECK(p.split_offsets[0] == 0, "num_splits: must start at 0");
  for (int64_t seq = 0; seq < p.batch; ++seq) {
    const int32_t count = p.split_offsets[seq + 1] - p.split_offsets[seq];
    DSV3_CHECK(count >= 0 && p.split_offsets[seq + 1] <= max_splits && (count > 0) == (seqlen_of(p, seq) > 0),
               "num_splits: inconsistent with cache_seqlens at sequence ", seq, " (recompute get_mla_metadata)");
  }
  for (int64_t part = 0; part < p.num_parts; ++part) {
    const int32_t* row = p.metadata + part * kMlaMetadataInts;
    if (row[0] > row[2]) continue;  // empty part
    DSV3_CHECK(row[0] >= 0 && row[2] < p.batch, "tile_scheduler_metadata[", part, "]: sequence range outside batch");
    int32_t split = row[4];
    for (int64_t seq = row[0]; seq <= row[2]; ++seq) {
      const int32_t blocks = mla_blocks(seqlen_of(p, seq));
      const int32_t lo = seq == row[0] ? row[1] : 0, hi = seq == row[2] ? row[3] : blocks;
      DSV3_CHECK(lo >= 0 && hi <= blocks, "tile_scheduler_metadata[", part, "]: block range outside sequence ", seq,
                 " (recompute get_mla_metadata after cache_seqlens change)");
      if (lo >= hi) continue;
      DSV3_CHECK(split >= p.split_offsets[seq] && split < p.split_offsets[seq + 1], "tile_scheduler_metadata[", part,
                 "]: split id ", split, " does not belong to sequence ", seq);
      ++split;
    }
  }
}

// n (a multiple of 16) bf16 values as fp32.
void bf16_row_to_float(const uint16_t* src, int64_t n, float* dst) {
#if defined(__AVX512F__)
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(dst + i, avx512::load_bf16(src + i));
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
#endif
}

// s[j] = exp(s[j] - shift) for j < tokens; returns the sum of the new values.
float exp_and_sum(float* s, int tokens, float shift) {
#if defined(__AVX512F__)
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < tokens; j += 16) {
    const __mmask16 mask = tokens - j >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (tokens - j)) - 1);
    const __m512 e = avx512::exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + j), _mm512_set1_ps(shift)));
    _mm512_mask_storeu_ps(s + j, mask, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
  }
  return avx512::horizontal_sum(sum);
#else
  float sum = 0.0f;
  for (int j = 0; j < tokens; ++j) {
    s[j] = std::exp(s[j] - shift);
    sum += s[j];
  }
  return sum;
#endif
}

// Decodes the cache row of one token into 576 fp32 values.
void load_row(const MlaDecodeParams& p, int32_t page, int row, float* values) {
  if (!p.fp8_cache) {
    const auto* bf16 =
        reinterpret_cast<const uint16_t*>(p.kv_cache) + (int64_t{page} * kMlaPageSize + row) * kMlaHeadDim;
    bf16_row_to_float(bf16, kMlaHeadDim, values);
    return;
  }
  const uint8_t* bytes = p.kv_cache + (int64_t{page} * kMlaPageSize + row) * kMlaFp8RowBytes;
  float scales[kMlaLatentDim / 128];
  std::memcpy(scales, bytes + kMlaLatentDim, sizeof(scales));
  for (int d = 0; d < kMlaLatentDim; ++d) values[d] = e4m3_to_float(bytes[d]) * scales[d / 128];
  uint16_t rope[kMlaRopeDim];
  std::memcpy(rope, bytes + kMlaLatentDim + sizeof(scales), sizeof(rope));
  for (int d = 0; d < kMlaRopeDim; ++d) values[kMlaLatentDim + d] = bf16_to_float(rope[d]);
}

constexpr int64_t kRowBlock = 4;  // query rows sharing each key / value row loaded from cache
constexpr int kLanes = 16;        // one vector of fp32: partial sums kept in registers, combined once at the end

// The 576 fp32 values a token's cache row decodes to hold its key; the first head_dim_v of them are its value, read
// in place (row stride kMlaHeadDim). Two kernels on them, for kCount (<= kRowBlock) query rows at a time, so each key
// or value vector loaded serves every row: AVX-512 with FMA where the build has it, else portable loops in a fixed
// lane order that the compiler vectorizes without reassociating.
#if defined(__AVX512F__)

// scores[i * 64] = q_i . key.
template <int kCount>
void dot_rows(const float* q, const float* key, float* scores) {
  __m512 lanes[kCount];
  for (int i = 0; i < kCount; ++i) lanes[i] = _mm512_setzero_ps();
  for (int d = 0; d < kMlaHeadDim; d += kLanes) {
    const __m512 k = _mm512_loadu_ps(key + d);
    for (int i = 0; i < kCount; ++i) lanes[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i * kMlaHeadDim + d), k, lanes[i]);
  }
  for (int i = 0; i < kCount; ++i) scores[i * kMlaPageSize] = avx512::horizontal_sum(lanes[i]);
}

// acc_i += sum_j weights[i * 64 + j] * value_j: a 16-wide slice of the kCount accumulators stays in registers across
// all tokens of the block, so acc is read and written once per block.
template <int kCount>
void accumulate_rows(const float* weights, const float* values, int tokens, int64_t dv, float* acc) {
  int64_t c = 0;
  for (; c + kLanes <= dv; c += kLanes) {
    __m512 slice[kCount];
    for (int i = 0; i < kCount; ++i) slice[i] = _mm512_loadu_ps(acc + i * dv + c);
    for (int j = 0; j < tokens; ++j) {
      const __m512 v = _mm512_loadu_ps(values + j * kMlaHeadDim + c);
      for (int i = 0; i < kCount; ++i)
        slice[i] = _mm512_fmadd_ps(_mm512_set1_ps(weights[i * kMlaPageSize + j]), v, slice[i]);
    }
    for (int i = 0; i < kCount; ++i) _mm512_storeu_ps(acc + i * dv + c, slice[i]);
  }
  for (; c < dv; ++c) {  // head_dim_v not a multiple of 16
    for (int i = 0; i < kCount; ++i) {
      float sum = acc[i * dv + c];
      for (int j = 0; j < tokens; ++j) sum += weights[i * kMlaPageSize + j] * values[j * kMlaHeadDim + c];
      acc[i * dv + c] = sum;
    }
  }
}

#else

template <int kCount>
void dot_rows(const float* q, const float* key, float* scores) {
  float lanes[kCount][kLanes] = {};
  for (int d = 0; d < kMlaHeadDim; d += kLanes) {
    for (int i = 0; i < kCount; ++i) {
      for (int l = 0; l < kLanes; ++l) lanes[i][l] += q[i * kMlaHeadDim + d + l] * key[d + l];
    }
  }
  for (int i = 0; i < kCount; ++i) {
    float sum = 0.0f;
    for (int l = 0; l < kLanes; ++l) sum += lanes[i][l];
    scores[i * kMlaPageSize] = sum;
  }
}

template <int kCount>
void accumulate_rows(const float* weights, const float* values, int tokens, int64_t dv, float* acc) {
  for (int j = 0; j < tokens; ++j) {
    for (int i = 0; i < kCount; ++i) {
      const float w = weights[i * kMlaPageSize + j];
      for (int64_t c = 0; c < dv; ++c) acc[i * dv + c] += w * values[j * kMlaHeadDim + c];
    }
  }
}

#endif

// Runs fn.template operator()<count>() for count = min(kRowBlock, rows - r) over r = 0, kRowBlock, ...
template <typename Fn>
void for_row_blocks(int64_t rows, Fn&& fn) {
  for (int64_t r = 0; r < rows; r += kRowBlock) {
    switch (std::min<int64_t>(kRowBlock, rows - r)) {
      case 4:
        fn(r, std::integral_constant<int, 4>{});
        break;
      case 3:
        fn(r, std::integral_constant<int, 3>{});
        break;
      case 2:
        fn(r, std::integral_constant<int, 2>{});
        break;
      default:
        fn(r, std::integral_constant<int, 1>{});
    }
  }
}

// The attention step (cpu/mla_attend.h) in fp32 on AVX-512 or portable loops: every query row against every cache row
// of a page decoded to fp32.
void attend_fp32(const MlaDecodeParams& p, int64_t seq, int32_t first_block, int32_t last_block,
                 const MlaSplitState& state) {
  const int64_t rows = p.s_q * p.heads, dv = p.head_dim_v;
  const int32_t seqlen = seqlen_of(p, seq);
  // Per-thread scratch, grown as needed and reused across splits and calls.
  thread_local std::vector<float> q, scores, keys;
  q.resize(rows * kMlaHeadDim);
  scores.resize(rows * kMlaPageSize);
  keys.resize(kMlaPageSize * kMlaHeadDim);
  float* running_max = state.running_max;
  float* running_sum = state.running_sum;
  const uint16_t* q_seq = p.q + seq * rows * kMlaHeadDim;  // rows ordered (query token, head)
  bf16_row_to_float(q_seq, rows * kMlaHeadDim, q.data());

  for (int32_t block = first_block; block < last_block; ++block) {
    const int32_t page = p.block_table[seq * p.max_blocks + block];
    const int tokens = std::min(kMlaPageSize, seqlen - block * kMlaPageSize);  // never past the sequence's end
    for (int j = 0; j < tokens; ++j) load_row(p, page, j, keys.data() + j * kMlaHeadDim);
    for_row_blocks(rows, [&](int64_t r, auto count) {
      for (int j = 0; j < tokens; ++j) {
        dot_rows<count()>(q.data() + r * kMlaHeadDim, keys.data() + j * kMlaHeadDim,
                          scores.data() + r * kMlaPageSize + j);
      }
    });
    for (int64_t r = 0; r < rows; ++r) {
      float* s = scores.data() + r * kMlaPageSize;
      // query token r / heads sits at position seqlen - s_q + (r / heads) and sees keys up to there when causal
      const int64_t visible_end =
          p.causal ? std::min<int64_t>(tokens, seqlen - p.s_q + r / p.heads + 1 - int64_t{block} * kMlaPageSize)
                   : tokens;
      float block_max = kNegInf;
      for (int j = 0; j < tokens; ++j) {
        s[j] = j < visible_end ? s[j] * p.softmax_scale : kNegInf;
        block_max = std::max(block_max, s[j]);
      }
      if (block_max == kNegInf) {  // nothing visible for this query in this block: it adds nothing
        std::fill(s, s + tokens, 0.0f);
        continue;
      }
      const float new_max = std::max(running_max[r], block_max);
      const float rescale = std::exp(running_max[r] - new_max);  // 0 on the first visible block
      float* a = state.acc + r * dv;
      for (int64_t c = 0; c < dv; ++c) a[c] *= rescale;
      running_sum[r] = running_sum[r] * rescale + exp_and_sum(s, tokens, new_max);  // scores become weights
      running_max[r] = new_max;
    }
    for_row_blocks(rows, [&](int64_t r, auto count) {
      accumulate_rows<count()>(scores.data() + r * kMlaPageSize, keys.data(), tokens, dv, state.acc + r * dv);
    });
  }
}

// Attention of all s_q x heads queries of one sequence over KV blocks [first_block, last_block): writes the split's
// normalized output and lse, either as the final result (the sequence has one split) or into the workspace.
void attend_split(const MlaDecodeParams& p, int64_t seq, int32_t first_block, int32_t last_block, int32_t split) {
  const int64_t rows = p.s_q * p.heads, dv = p.head_dim_v;
  // Per-thread state, grown as needed and reused across splits and calls.
  thread_local std::vector<float> acc, running_max, running_sum;
  acc.assign(rows * dv, 0.0f);
  running_max.assign(rows, kNegInf);
  running_sum.assign(rows, 0.0f);
  const MlaSplitState state{acc.data(), running_max.data(), running_sum.data()};
#if defined(DSV3_MLA_AMX)
  if (amx::enabled()) {
    mla_attend_amx(p, seq, first_block, last_block, state);
  } else {
    attend_fp32(p, seq, first_block, last_block, state);
  }
#else
  attend_fp32(p, seq, first_block, last_block, state);
#endif

  const bool final_result = p.split_offsets[seq + 1] - p.split_offsets[seq] == 1;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = r / p.heads, head = r % p.heads;
    const bool empty = running_sum[r] == 0.0f;
    const float inverse = empty ? 0.0f : 1.0f / running_sum[r];
    const float lse = empty ? (final_result ? kPosInf : kNegInf) : running_max[r] + std::log(running_sum[r]);
    const float* a = acc.data() + r * dv;
    if (final_result) {
      uint16_t* out = p.out + ((seq * p.s_q + token) * p.heads + head) * dv;
      for (int64_t c = 0; c < dv; ++c) out[c] = float_to_bf16(a[c] * inverse);
      p.lse[(seq * p.heads + head) * p.s_q + token] = lse;
    } else {
      float* out = p.partial_out + ((int64_t{split} * p.s_q + token) * p.heads + head) * dv;
      for (int64_t c = 0; c < dv; ++c) out[c] = a[c] * inverse;
      p.partial_lse[(int64_t{split} * p.heads + head) * p.s_q + token] = lse;
    }
  }
}

void run_part(const MlaDecodeParams& p, int64_t part) {
  const int32_t* row = p.metadata + part * kMlaMetadataInts;
  int32_t split = row[4];
  for (int64_t seq = row[0]; seq <= row[2]; ++seq) {
    const int32_t lo = seq == row[0] ? row[1] : 0;
    const int32_t hi = seq == row[2] ? row[3] : mla_blocks(seqlen_of(p, seq));
    if (lo < hi) attend_split(p, seq, lo, hi, split++);
  }
}

// lse = log sum_i exp(lse_i), out = sum_i exp(lse_i - lse) out_i over the non-empty splits of each sequence with
// != 1 splits (single-split sequences were written directly); no splits or no visible key: out 0, lse +inf.
void combine(const MlaDecodeParams& p) {
  const int64_t dv = p.head_dim_v;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t seq = 0; seq < p.batch; ++seq) {
    const int32_t first = p.split_offsets[seq], count = p.split_offsets[seq + 1] - first;
    if (count == 1) continue;
    std::vector<float> merged(dv);
    for (int64_t token = 0; token < p.s_q; ++token) {
      for (int64_t head = 0; head < p.heads; ++head) {
        auto split_lse = [&](int32_t i) {
          return p.partial_lse[((first + int64_t{i}) * p.heads + head) * p.s_q + token];
        };
        float max_lse = kNegInf;
        for (int32_t i = 0; i < count; ++i) max_lse = std::max(max_lse, split_lse(i));
        std::fill(merged.begin(), merged.end(), 0.0f);
        float lse = kPosInf;
        if (max_lse != kNegInf) {
          float sum = 0.0f;
          for (int32_t i = 0; i < count; ++i) sum += std::exp(split_lse(i) - max_lse);
          lse = max_lse + std::log(sum);
          for (int32_t i = 0; i < count; ++i) {
            if (split_lse(i) == kNegInf) continue;  // an empty split's output is undefined
            const float weight = std::exp(split_lse(i) - lse);
            const float* part = p.partial_out + (((first + int64_t{i}) * p.s_q + token) * p.heads + head) * dv;
            for (int64_t c = 0; c < dv; ++c) merged[c] += weight * part[c];
          }
        }
        uint16_t* out = p.out + ((seq * p.s_q + token) * p.heads + head) * dv;
        for (int64_t c = 0; c < dv; ++c) out[c] = float_to_bf16(merged[c]);
        p.lse[(seq * p.heads + head) * p.s_q + token] = lse;
      }
    }
  }
}

}  // namespace

void mla_schedule(const MlaScheduleParams& params) {
  validate(params);
  for (int64_t i = 0; i < params.batch; ++i) {
    DSV3_CHECK(params.cache_seqlens[i] >= 0, "cache_seqlens[", i, "]=", params.cache_seqlens[i], ": negative");
  }
  compute_mla_schedule(params.cache_seqlens, params.batch, params.num_parts, params.metadata, params.split_offsets);
}

void mla_decode(const MlaDecodeParams& params) {
  validate(params);
  check_inputs(params);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t part = 0; part < params.num_parts; ++part) run_part(params, part);
  combine(params);
}

}  // namespace dsv3::cpu
