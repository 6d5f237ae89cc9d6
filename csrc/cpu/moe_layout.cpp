// MoE token layouts and (un)permutation on the CPU. Layouts are a counting sort of the (token, slot) entries by
// expert, stable in (token, slot) order; permutation is a row copy (or the fused per-token-group FP8 quantization of
// dsv3/fp8.h); unpermutation is the top-k weighted sum in fp32 in slot order. All bit-exact with dsv3.reference.moe.

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/fp8_rows.h"

namespace dsv3::cpu {
namespace {

// (Un)permutations touching fewer elements than this run on the calling thread: waking the OpenMP team costs more
// than it saves (decode batches).
constexpr int64_t kParallelElements = 262144;

template <typename Index>
void count_slots(const MoeLayoutParams& p) {
  const auto* topk_idx = static_cast<const Index*>(p.topk_idx);
  std::fill(p.tokens_per_expert, p.tokens_per_expert + p.num_experts, 0);
  for (int64_t i = 0; i < p.tokens * p.topk; ++i) {
    const int64_t e = static_cast<int64_t>(topk_idx[i]);
    DSV3_CHECK(e >= -1 && e < p.num_experts, "topk_idx: values must lie in [-1, ", p.num_experts,
               ") (-1 = no expert), got ", e, " at [", i / p.topk, ", ", i % p.topk, "]");
    if (e >= 0) ++p.tokens_per_expert[e];
  }
  if (p.masked) {
    for (int64_t e = 0; e < p.num_experts; ++e) {
      DSV3_CHECK(p.tokens_per_expert[e] <= p.max_m, "expert ", e, " receives ", p.tokens_per_expert[e],
                 " rows, more than max_m=", p.max_m);
      p.masked_m[e] = p.tokens_per_expert[e];
    }
    return;
  }
  p.expert_offsets[0] = 0;
  for (int64_t e = 0; e < p.num_experts; ++e) {
    const int64_t padded = (p.tokens_per_expert[e] + p.alignment - 1) / p.alignment * p.alignment;
    p.expert_offsets[e + 1] = p.expert_offsets[e] + padded;
  }
}

template <typename Index>
void place_slots(const MoeLayoutParams& p) {
  const auto* topk_idx = static_cast<const Index*>(p.topk_idx);
  std::fill(p.src_token, p.src_token + p.rows, -1);
  std::fill(p.src_slot, p.src_slot + p.rows, -1);
  if (p.m_indices) std::fill(p.m_indices, p.m_indices + p.rows, -1);
  // next[e]: the row expert e's next entry goes to
  std::vector<int64_t> next(p.num_experts);
  for (int64_t e = 0; e < p.num_experts; ++e) next[e] = p.masked ? e * p.max_m : p.expert_offsets[e];
  for (int64_t i = 0; i < p.tokens * p.topk; ++i) {
    const int64_t e = static_cast<int64_t>(topk_idx[i]);
    if (e < 0) {
      p.row_of[i] = -1;
      continue;
    }
    const int64_t row = next[e]++;
    p.row_of[i] = row;
    p.src_token[row] = i / p.topk;
    p.src_slot[row] = i % p.topk;
    if (p.m_indices) p.m_indices[row] = static_cast<int32_t>(e);
  }
}

void check_indices(const int64_t* indices, int64_t n, int64_t bound, const char* name) {
  for (int64_t i = 0; i < n; ++i) {
    DSV3_CHECK(indices[i] >= -1 && indices[i] < bound, name, ": values must lie in [-1, ", bound, "), got ", indices[i],
               " at flat index ", i);
  }
}

template <DType kType>
void permute_rows(const MoePermuteParams& p) {
  using Storage = typename Element<kType>::Storage;
  const auto* x = static_cast<const Storage*>(p.x);
  const int64_t groups = p.quantize ? p.hidden / kMoeQuantGroup : 0;
  const float zero_row_scale = scale_from_amax(0.0f, p.ue8m0);
#pragma omp parallel for schedule(static) if (p.rows * p.hidden >= kParallelElements)
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t token = p.src_token[r];
    const Storage* src = token >= 0 ? x + token * p.hidden : nullptr;
    if (!p.quantize) {
      Storage* dst = static_cast<Storage*>(p.out) + r * p.hidden;
      if (src) {
        std::memcpy(dst, src, p.hidden * sizeof(Storage));
      } else {
        std::memset(dst, 0, p.hidden * sizeof(Storage));
      }
      continue;
    }
    uint8_t* q = p.q + r * p.hidden;
    float* scales = p.scales + r * groups;
    for (int64_t g = 0; g < groups; ++g) {
      if (!src) {
        std::memset(q + g * kMoeQuantGroup, 0, kMoeQuantGroup);
        scales[g] = zero_row_scale;
        continue;
      }
      const Storage* group = src + g * kMoeQuantGroup;
      const float scale = scale_from_amax(group_amax<kType>(group, kMoeQuantGroup), p.ue8m0);
      quantize_row<kType>(group, q + g * kMoeQuantGroup, kMoeQuantGroup, scale);
      scales[g] = scale;
    }
  }
}

template <DType kType>
void unpermute_rows(const MoeUnpermuteParams& p) {
  using Storage = typename Element<kType>::Storage;
  const auto* y = static_cast<const Storage*>(p.y);
  auto* out = static_cast<Storage*>(p.out);
#pragma omp parallel if (p.tokens * p.topk * p.hidden >= kParallelElements)
  {
    std::vector<float> acc(p.hidden);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < p.topk; ++k) {
        const int64_t row = p.row_of[t * p.topk + k];
        if (row < 0) continue;
        const float w = p.weights[t * p.topk + k];
        const Storage* src = y + row * p.hidden;
        for (int64_t h = 0; h < p.hidden; ++h) acc[h] = acc[h] + w * Element<kType>::load(src[h]);
      }
      Storage* dst = out + t * p.hidden;
      for (int64_t h = 0; h < p.hidden; ++h) dst[h] = Element<kType>::store(acc[h]);
    }
  }
}

}  // namespace

void moe_layout_count(const MoeLayoutParams& params) {
  validate(params);
  dispatch_index_type(params.idx_int64, [&](auto index) { count_slots<decltype(index)>(params); });
}

void moe_layout_scatter(const MoeLayoutParams& params) {
  validate(params);
  DSV3_CHECK(params.rows == 0 || (params.src_token && params.src_slot && (params.masked || params.m_indices)),
             "m_indices/src_token/src_slot: null pointer");
  DSV3_CHECK(params.tokens * params.topk == 0 || params.row_of, "row_of: null pointer");
  if (!params.masked) {
    DSV3_CHECK(params.rows == params.expert_offsets[params.num_experts], "m_indices: expected ",
               params.expert_offsets[params.num_experts], " rows (expert_offsets[-1]), got ", params.rows);
  }
  // Re-count: the placement below trusts the counts to match topk_idx, which may have changed since counting.
  std::vector<int32_t> counts(params.num_experts);
  std::vector<int64_t> offsets(params.num_experts + 1);
  MoeLayoutParams recount = params;
  recount.tokens_per_expert = counts.data();
  recount.masked_m = counts.data();
  recount.expert_offsets = offsets.data();
  dispatch_index_type(params.idx_int64, [&](auto index) { count_slots<decltype(index)>(recount); });
  if (!params.masked) {
    for (int64_t e = 0; e <= params.num_experts; ++e) {
      DSV3_CHECK(offsets[e] == params.expert_offsets[e], "expert_offsets: do not match topk_idx at expert ", e);
    }
  }
  dispatch_index_type(params.idx_int64, [&](auto index) { place_slots<decltype(index)>(params); });
}

void moe_permute(const MoePermuteParams& params) {
  validate(params);
  check_indices(params.src_token, params.rows, params.tokens, "src_token");
  dispatch_float_type(params.x_dtype, [&](auto type) { permute_rows<decltype(type)::value>(params); });
}

void moe_unpermute(const MoeUnpermuteParams& params) {
  validate(params);
  check_indices(params.row_of, params.tokens * params.topk, params.rows, "row_of");
  dispatch_float_type(params.dtype, [&](auto type) { unpermute_rows<decltype(type)::value>(params); });
}

}  // namespace dsv3::cpu
