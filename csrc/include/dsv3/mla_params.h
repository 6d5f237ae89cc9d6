#pragma once
// Parameters of the MLA decode ops (paged latent cache, FlashMLA semantics) and the invariants the kernels rely on.

#include <cstdint>

#include "dsv3/check.h"
#include "dsv3/dtype.h"
#include "dsv3/mla_schedule.h"

namespace dsv3 {

struct MlaScheduleParams {
  const int32_t* cache_seqlens;  // [batch]
  int32_t* metadata;             // [num_parts, 8]
  int32_t* split_offsets;        // [batch + 1]
  int64_t batch;
  int64_t num_parts;
};

struct MlaDecodeParams {
  const uint16_t* q;        // [batch, s_q, heads, 576] bf16
  const uint8_t* kv_cache;  // [num_blocks, 64, 1, 576] bf16, or [num_blocks, 64, 1, 656] bytes when fp8_cache
  bool fp8_cache;
  const int32_t* block_table;    // [batch, max_blocks] page ids
  const int32_t* cache_seqlens;  // [batch], new tokens included
  const int32_t* metadata;       // [num_parts, 8] from compute_mla_schedule
  const int32_t* split_offsets;  // [batch + 1]
  uint16_t* out;                 // [batch, s_q, heads, head_dim_v] bf16
  float* lse;                    // [batch, heads, s_q]
  float* partial_out;            // [batch + num_parts, s_q, heads, head_dim_v] workspace
  float* partial_lse;            // [batch + num_parts, heads, s_q] workspace
  int64_t batch;
  int64_t s_q;
  int64_t heads;
  int64_t num_blocks;
  int64_t max_blocks;
  int64_t num_parts;
  int64_t head_dim_v;
  float softmax_scale;
  bool causal;
};

struct MlaAppendParams {
  uint8_t* kv_cache;  // [num_blocks, 64, 1, 576] bf16, or [num_blocks, 64, 1, 656] bytes when fp8_cache
  bool fp8_cache;
  const int64_t* slot_mapping;  // [tokens]: block_id * 64 + offset, -1 to skip
  const void* latent;           // [tokens, 512], dtype input_dtype
  const void* rope;             // [tokens, 64], dtype input_dtype
  DType input_dtype;            // bf16 or fp32
  int64_t tokens;
  int64_t num_blocks;
  bool ue8m0;  // FP8 cache: power-of-two scales
};

inline void validate(const MlaScheduleParams& p) {
  DSV3_CHECK(p.batch >= 0, "cache_seqlens: negative batch");
  DSV3_CHECK(p.num_parts >= 1, "num_parts: expected >= 1, got ", p.num_parts);
}

inline void validate(const MlaDecodeParams& p) {
  DSV3_CHECK(p.batch >= 0 && p.s_q >= 1 && p.heads >= 1, "q: bad shape [", p.batch, ", ", p.s_q, ", ", p.heads, "]");
  DSV3_CHECK(p.head_dim_v >= 1 && p.head_dim_v <= kMlaLatentDim, "head_dim_v: expected 1..512, got ", p.head_dim_v);
  DSV3_CHECK(p.num_parts >= 1, "tile_scheduler_metadata: expected at least one part");
  DSV3_CHECK(p.num_blocks >= 0 && p.max_blocks >= 0, "kv_cache/block_table: negative sizes");
}

inline void validate(const MlaAppendParams& p) {
  DSV3_CHECK(p.input_dtype == DType::kBFloat16 || p.input_dtype == DType::kFloat32,
             "latent/rope: expected bfloat16 or float32, got ", dtype_name(p.input_dtype));
  DSV3_CHECK(p.tokens >= 0 && p.num_blocks >= 0, "negative sizes");
}

}  // namespace dsv3
