#pragma once
// Entry points of the CPU kernels (csrc/cpu/*.cpp). Each validates its parameters and runs on the calling thread's
// OpenMP team.

#include "dsv3/ep_params.h"
#include "dsv3/gemm_params.h"
#include "dsv3/grouped_gemm_params.h"
#include "dsv3/layer_params.h"
#include "dsv3/mla_params.h"
#include "dsv3/moe_params.h"
#include "dsv3/quant_params.h"

namespace dsv3::cpu {

void per_token_group_quant_fp8(const TokenGroupQuantParams& params);
void per_block_quant_fp8(const BlockQuantParams& params);
void dequant_fp8_block(const BlockDequantParams& params);
void silu_and_mul_quant_fp8(const SiluMulQuantParams& params);

void fp8_gemm_nt(const Fp8GemmParams& params);
void fp8_linear(const Fp8LinearParams& params);
void grouped_fp8_gemm(const GroupedFp8GemmParams& params);

void rms_norm(const RmsNormParams& params);
void apply_rope(const RopeParams& params);

void mla_schedule(const MlaScheduleParams& params);
void mla_decode(const MlaDecodeParams& params);
void mla_append_kv(const MlaAppendParams& params);

void grouped_topk(const GroupedTopkParams& params);
// Layouts in two calls, so the caller can size the row outputs between them: counting validates topk_idx (raising
// on an expert outside [-1, E) or, masked, on more than max_m rows) and fills the counts and offsets; placing fills
// the rows (it counts again, so it never trusts offsets that no longer match topk_idx).
void moe_layout_count(const MoeLayoutParams& params);
void moe_layout_scatter(const MoeLayoutParams& params);
void moe_permute(const MoePermuteParams& params);
void moe_unpermute(const MoeUnpermuteParams& params);
// fused_experts on the CPU: the steps above (quantization, layout, grouped GEMMs, combine) in one call.
void fused_moe(const FusedMoeParams& params);

// Expert-parallel packing: byte-row copies (index values checked, destinations distinct) and the rank-ordered fp32
// reduction of returned rows (tokens of one rank distinct).
void ep_copy_rows(const EpCopyRowsParams& params);
void ep_combine_reduce(const EpCombineParams& params);

}  // namespace dsv3::cpu
