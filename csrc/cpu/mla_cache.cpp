// Writing new tokens into the paged MLA latent cache on the CPU: bf16 rows, or 656-byte FP8 rows quantized with
// the per-token-group rules of dsv3/fp8.h (bit-exact with dsv3.reference.mla.pack_fp8_kv).

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/fp8_rows.h"

namespace dsv3::cpu {
namespace {

void check_slots(const MlaAppendParams& p) {
  std::vector<int64_t> used;
  used.reserve(p.tokens);
  for (int64_t t = 0; t < p.tokens; ++t) {
    const int64_t slot = p.slot_mapping[t];
    DSV3_CHECK(slot >= -1 && slot < p.num_blocks * kMlaPageSize, "slot_mapping[", t, "]=", slot, ": expected -1 or 0..",
               p.num_blocks * kMlaPageSize - 1);
    if (slot >= 0) used.push_back(slot);
  }
  std::sort(used.begin(), used.end());
  const auto repeated = std::adjacent_find(used.begin(), used.end());
  DSV3_CHECK(repeated == used.end(), "slot_mapping: slot ", repeated == used.end() ? 0 : *repeated,
             " is written by two tokens");
}

template <DType kType>
void append_rows(const MlaAppendParams& p) {
  using Storage = typename Element<kType>::Storage;
  const auto* latent = static_cast<const Storage*>(p.latent);
  const auto* rope = static_cast<const Storage*>(p.rope);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < p.tokens; ++t) {
    const int64_t slot = p.slot_mapping[t];
    if (slot < 0) continue;
    const Storage* token_latent = latent + t * kMlaLatentDim;
    const Storage* token_rope = rope + t * kMlaRopeDim;
    if (!p.fp8_cache) {
      auto* row = reinterpret_cast<uint16_t*>(p.kv_cache) + slot * kMlaHeadDim;
      for (int d = 0; d < kMlaLatentDim; ++d) row[d] = float_to_bf16(Element<kType>::load(token_latent[d]));
      for (int d = 0; d < kMlaRopeDim; ++d) row[kMlaLatentDim + d] = float_to_bf16(Element<kType>::load(token_rope[d]));
      continue;
    }
    uint8_t* row = p.kv_cache + slot * kMlaFp8RowBytes;
    float scales[kMlaLatentDim / 128];
    for (int g = 0; g < kMlaLatentDim / 128; ++g) {
      scales[g] = scale_from_amax(group_amax<kType>(token_latent + g * 128, 128), p.ue8m0);
      quantize_row<kType>(token_latent + g * 128, row + g * 128, 128, scales[g]);
    }
    std::memcpy(row + kMlaLatentDim, scales, sizeof(scales));
    uint16_t rope_bf16[kMlaRopeDim];
    for (int d = 0; d < kMlaRopeDim; ++d) rope_bf16[d] = float_to_bf16(Element<kType>::load(token_rope[d]));
    std::memcpy(row + kMlaLatentDim + sizeof(scales), rope_bf16, sizeof(rope_bf16));
  }
}

}  // namespace

void mla_append_kv(const MlaAppendParams& params) {
  validate(params);
  check_slots(params);
  if (params.input_dtype == DType::kBFloat16) {
    append_rows<DType::kBFloat16>(params);
  } else {
    append_rows<DType::kFloat32>(params);
  }
}

}  // namespace dsv3::cpu
