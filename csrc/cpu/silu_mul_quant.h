#pragma once
// SiLU-and-mul fused with the per-token FP8 quantization, one row at a time (shared by the op and fused_experts).

#include <cstdint>

namespace dsv3::cpu {

// row: one [2 * inter] bf16 row of a gate/up output -> inter e4m3 codes of bf16(silu(gate) * up) and inter / 128
// scales (per_token_group_quant_fp8's arithmetic on the bf16 values). inter is a multiple of 128.
void silu_mul_quant_row(const uint16_t* row, int64_t inter, uint8_t* q, float* scales);

}  // namespace dsv3::cpu
