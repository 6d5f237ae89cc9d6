#pragma once
// Parameters of the MoE routing, token layout and (un)permutation ops, and the invariants every backend relies on.
// Pointers are raw host or device addresses handed over by dsv3.ops, which has checked dtypes, devices, shapes and
// contiguity; validate() re-checks what keeps a kernel in bounds. Index *values* (topk_idx, src_token, row_of) are
// checked by the CPU kernels, which raise, and guarded by the CUDA kernels, which skip what is out of range.

#include <cstdint>

#include "dsv3/check.h"
#include "dsv3/dtype.h"

namespace dsv3 {

// Limits of the router (a CUDA warp owns a token: experts spread over its 32 lanes, one lane per group, one lane per
// picked expert) and of the layouts (a thread per expert scans the counts). DeepSeek-V3: 256 experts, 8 groups, top-8.
constexpr int64_t kMoeMaxExperts = 1024;
constexpr int64_t kMoeMaxGroups = 32;
constexpr int64_t kMoeMaxTopk = 32;
// (token, slot) entries one CUDA layout block ranks; the layout workspace holds [ceil(entries / chunk), E] counts.
constexpr int64_t kMoeLayoutChunk = 1024;
// Channels per FP8 scale of the fused permute-and-quantize (per_token_group_quant_fp8 with group_size 128).
constexpr int64_t kMoeQuantGroup = 128;

struct GroupedTopkParams {
  const void* logits;  // [tokens, num_experts], dtype logits_dtype (fp32, bf16 or fp16)
  DType logits_dtype;
  const float* bias;  // [num_experts]
  float* weights;     // [tokens, topk]
  int32_t* indices;   // [tokens, topk]
  int64_t tokens;
  int64_t num_experts;
  int64_t num_groups;
  int64_t topk_group;
  int64_t topk;
  float routed_scaling_factor;
  bool renormalize;
};

// Both token layouts. Counting (moe_layout_count) fills tokens_per_expert, expert_offsets / masked_m and, on the GPU,
// the workspace and errors; placing (moe_layout_scatter) then fills the per-row and per-slot outputs.
struct MoeLayoutParams {
  const void* topk_idx;  // [tokens, topk], int32 or int64 (idx_int64): an expert in [0, E), or -1 for none
  bool idx_int64;
  int64_t tokens;
  int64_t topk;
  int64_t num_experts;
  bool masked;        // masked layout [E, max_m] rather than the contiguous one
  int64_t alignment;  // contiguous: each expert's rows are padded to a multiple of this
  int64_t max_m;      // masked: rows of each expert's slab
  int64_t rows;       // rows allocated for m_indices / src_token / src_slot: contiguous >= M_sum, masked E * max_m
  int32_t* tokens_per_expert;  // [E] slots routed to each expert (masked: before capping at max_m)
  int64_t* expert_offsets;     // contiguous [E + 1], expert e owns rows [offsets[e], offsets[e + 1]); masked: null
  int32_t* masked_m;           // masked [E] = min(tokens_per_expert, max_m); contiguous: null
  int32_t* workspace;          // GPU [ceil(tokens * topk / kMoeLayoutChunk), E] per-chunk counts; CPU: null
  int32_t* errors;     // GPU [2]: slots whose expert lies outside [-1, E), slots dropped past max_m; CPU: null (raises)
  int32_t* m_indices;  // contiguous [rows] expert of each row, -1 for padding; masked: null
  int64_t* src_token;  // [rows] token copied into each row, -1 for padding
  int64_t* src_slot;   // [rows] k-slot of that token, -1 for padding
  int64_t* row_of;     // [tokens, topk] row of each (token, slot), -1 where it has none
};

struct MoePermuteParams {
  const void* x;  // [tokens, hidden], dtype x_dtype (fp32, bf16 or fp16)
  DType x_dtype;
  const int64_t* src_token;  // [rows] token of each row, -1 (or anything outside [0, tokens)) for a zero row
  void* out;                 // [rows, hidden] dtype x_dtype; null when quantize
  uint8_t* q;                // quantize: [rows, hidden] e4m3; else null
  float* scales;             // quantize: [rows, hidden / 128]; else null
  int64_t tokens;
  int64_t hidden;
  int64_t rows;
  bool quantize;
  bool ue8m0;  // quantize: power-of-two scales
};

struct MoeUnpermuteParams {
  const void* y;  // [rows, hidden], dtype (fp32, bf16 or fp16)
  DType dtype;
  const int64_t* row_of;  // [tokens, topk] row of y holding (token, slot), -1 for none
  const float* weights;   // [tokens, topk]
  void* out;              // [tokens, hidden] dtype
  int64_t tokens;
  int64_t topk;
  int64_t rows;
  int64_t hidden;
};

// The routed experts of a MoE layer, plus optionally its shared expert, in one call (the CPU's fused_experts):
//   out[t] = bf16( sum over slots j with e = topk_idx[t, j] >= 0 of topk_weights[t, j] * expert_e(x[t]) )  (fp32)
//   with a shared expert: out[t] = bf16(out[t] + shared(x[t]))  (the bf16 sum of the two bf16 outputs)
// where expert(x) = down(quant(silu_and_mul(gate_up(quant(x))))), every projection an FP8 block-scaled GEMM and every
// activation quantized per token and 128 channels, as dsv3.reference.fused_experts specifies.
struct FusedMoeParams {
  const uint16_t* x;               // [tokens, hidden] bf16, or null when the tokens come quantized:
  const uint8_t* x_codes;          //   [tokens, hidden] e4m3 (per_token_group_quant_fp8 of the tokens)
  const float* x_scales;           //   [tokens, hidden / 128]
  const float* topk_weights;       // [tokens, topk]
  const int32_t* topk_idx;         // [tokens, topk] an expert in [0, experts), or -1 for none
  const uint8_t* w13;              // [experts, 2 * inter, hidden] e4m3: gate rows, then up rows
  const float* w13_scales;         // [experts, 2 * inter / 128, hidden / 128]
  const uint8_t* w2;               // [experts, hidden, inter] e4m3
  const float* w2_scales;          // [experts, hidden / 128, inter / 128]
  const uint8_t* shared_w13;       // [2 * shared_inter, hidden] e4m3, or null: no shared expert
  const float* shared_w13_scales;  // [2 * shared_inter / 128, hidden / 128]
  const uint8_t* shared_w2;        // [hidden, shared_inter] e4m3
  const float* shared_w2_scales;   // [hidden / 128, shared_inter / 128]
  uint16_t* out;                   // [tokens, hidden] bf16
  int64_t tokens;
  int64_t topk;
  int64_t experts;
  int64_t hidden;        // multiple of 128
  int64_t inter;         // multiple of 128
  int64_t shared_inter;  // multiple of 128 (ignored without a shared expert)
};

inline int64_t moe_layout_chunks(int64_t entries) { return (entries + kMoeLayoutChunk - 1) / kMoeLayoutChunk; }

inline void validate(const GroupedTopkParams& p) {
  DSV3_CHECK(
      p.logits_dtype == DType::kFloat32 || p.logits_dtype == DType::kBFloat16 || p.logits_dtype == DType::kFloat16,
      "router_logits: expected float32, bfloat16 or float16, got ", dtype_name(p.logits_dtype));
  DSV3_CHECK(p.tokens >= 0, "router_logits: negative token count ", p.tokens);
  DSV3_CHECK(p.num_experts > 0 && p.num_experts <= kMoeMaxExperts, "router_logits: expected 1..", kMoeMaxExperts,
             " experts, got ", p.num_experts);
  DSV3_CHECK(p.num_groups > 0 && p.num_groups <= kMoeMaxGroups && p.num_experts % p.num_groups == 0,
             "num_expert_group=", p.num_groups, " must divide E=", p.num_experts, " and be at most ", kMoeMaxGroups);
  const int64_t group_size = p.num_experts / p.num_groups;
  DSV3_CHECK(group_size >= 2, "num_expert_group=", p.num_groups, ": each group needs at least 2 experts, got ",
             group_size);
  DSV3_CHECK(p.topk_group > 0 && p.topk_group <= p.num_groups, "topk_group=", p.topk_group, " must lie in [1, ",
             p.num_groups, "]");
  DSV3_CHECK(p.topk > 0 && p.topk <= p.topk_group * group_size && p.topk <= kMoeMaxTopk, "topk=", p.topk,
             " must lie in [1, ", p.topk_group * group_size < kMoeMaxTopk ? p.topk_group * group_size : kMoeMaxTopk,
             "]");
  DSV3_CHECK(p.tokens == 0 || (p.logits && p.bias && p.weights && p.indices),
             "router_logits/correction_bias/outputs: null pointer");
}

inline void validate(const MoeLayoutParams& p) {
  DSV3_CHECK(p.tokens >= 0 && p.topk >= 0, "topk_idx: negative shape [", p.tokens, ", ", p.topk, "]");
  DSV3_CHECK(p.num_experts > 0 && p.num_experts <= kMoeMaxExperts, "num_experts: expected 1..", kMoeMaxExperts,
             ", got ", p.num_experts);
  if (p.masked) {
    DSV3_CHECK(p.max_m >= 0, "max_m: expected a non-negative value, got ", p.max_m);
    DSV3_CHECK(p.rows == p.num_experts * p.max_m, "src_token: expected ", p.num_experts * p.max_m, " rows, got ",
               p.rows);
    DSV3_CHECK(p.tokens_per_expert && p.masked_m, "tokens_per_expert/masked_m: null pointer");
  } else {
    DSV3_CHECK(p.alignment > 0, "alignment: expected a positive value, got ", p.alignment);
    DSV3_CHECK(p.rows >= 0, "m_indices: negative row count ", p.rows);
    DSV3_CHECK(p.tokens_per_expert && p.expert_offsets, "tokens_per_expert/expert_offsets: null pointer");
  }
  DSV3_CHECK(p.tokens * p.topk == 0 || p.topk_idx, "topk_idx: null pointer");
}

inline void validate(const MoePermuteParams& p) {
  DSV3_CHECK(p.x_dtype == DType::kFloat32 || p.x_dtype == DType::kBFloat16 || p.x_dtype == DType::kFloat16,
             "x: expected float32, bfloat16 or float16, got ", dtype_name(p.x_dtype));
  DSV3_CHECK(p.tokens >= 0 && p.hidden >= 0 && p.rows >= 0, "x/src_token: negative sizes");
  DSV3_CHECK(!p.quantize || p.hidden % kMoeQuantGroup == 0, "x: hidden size ", p.hidden,
             " is not a multiple of the quantization group ", kMoeQuantGroup);
  const bool has_output = p.quantize ? (p.q && p.scales) : p.out != nullptr;
  DSV3_CHECK(p.rows * p.hidden == 0 || (has_output && p.src_token && (p.tokens == 0 || p.x)),
             "x/src_token/outputs: null pointer");
}

inline void validate(const MoeUnpermuteParams& p) {
  DSV3_CHECK(p.dtype == DType::kFloat32 || p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16,
             "y: expected float32, bfloat16 or float16, got ", dtype_name(p.dtype));
  DSV3_CHECK(p.tokens >= 0 && p.topk >= 0 && p.rows >= 0 && p.hidden >= 0, "y/row_of: negative sizes");
  DSV3_CHECK(p.tokens * p.hidden == 0 || (p.out && (p.topk == 0 || (p.row_of && p.weights))),
             "row_of/topk_weights/out: null pointer");
  DSV3_CHECK(p.rows == 0 || p.hidden == 0 || p.y, "y: null pointer");
}

inline void validate(const FusedMoeParams& p) {
  DSV3_CHECK(p.tokens >= 0 && p.topk >= 0, "topk_idx: negative shape [", p.tokens, ", ", p.topk, "]");
  DSV3_CHECK(p.experts > 0 && p.experts <= kMoeMaxExperts, "w13: expected 1..", kMoeMaxExperts, " experts, got ",
             p.experts);
  DSV3_CHECK(p.hidden > 0 && p.hidden % kMoeQuantGroup == 0, "x: hidden size ", p.hidden,
             " must be a positive multiple of ", kMoeQuantGroup);
  DSV3_CHECK(p.inter > 0 && p.inter % kMoeQuantGroup == 0, "w2: intermediate size ", p.inter,
             " must be a positive multiple of ", kMoeQuantGroup);
  DSV3_CHECK(p.w13 && p.w13_scales && p.w2 && p.w2_scales, "w13/w2: null pointer");
  if (p.shared_w13) {
    DSV3_CHECK(p.shared_inter > 0 && p.shared_inter % kMoeQuantGroup == 0, "shared_w2: intermediate size ",
               p.shared_inter, " must be a positive multiple of ", kMoeQuantGroup);
    DSV3_CHECK(p.shared_w13_scales && p.shared_w2 && p.shared_w2_scales, "shared_w13/shared_w2: null pointer");
  }
  DSV3_CHECK(p.tokens == 0 || !p.x_codes == !p.x_scales, "x: the quantized tokens need both codes and scales");
  DSV3_CHECK(p.tokens == 0 || !p.x != !p.x_codes, "x: pass either bf16 tokens or quantized ones");
  DSV3_CHECK(p.tokens == 0 || ((p.x || p.x_codes) && p.out && (p.topk == 0 || (p.topk_weights && p.topk_idx))),
             "x/topk_weights/topk_idx/out: null pointer");
}

// Calls fn(int32_t{}) or fn(int64_t{}): the element type of topk_idx (int32 or int64).
template <typename Fn>
void dispatch_index_type(bool int64_index, Fn&& fn) {
  if (int64_index) {
    fn(int64_t{});
  } else {
    fn(int32_t{});
  }
}

}  // namespace dsv3
