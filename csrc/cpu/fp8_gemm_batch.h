#pragma once
// A batch of independent FP8 block-scaled GEMMs (csrc/cpu/fp8_gemm.cpp) run by one thread team: the grouped MoE
// GEMMs hand over one GEMM per expert. Work items are (GEMM, row block, column block) across the whole batch, handed
// out dynamically, so an expert with few rows never leaves threads idle while another's rows wait.

#include <cstdint>

#include "dsv3/gemm_params.h"

namespace dsv3::cpu {

struct Fp8GemmJob {
  // out[i] = a[row i] @ b^T for i < gemm.m; out is [gemm.m, gemm.n] row-major, b and its scales as in fp8_gemm_nt.
  Fp8GemmParams gemm;
  // [gemm.m]: the row of gemm.a (and of gemm.a_scales) that output row i reads, or null for row i itself. The rows are
  // gathered while a is decoded, so a permuted copy of the activations is never written.
  const int64_t* a_rows;
  // Unquantized activations [gemm.m, gemm.k] of dtype x_dtype (fp8_linear), or null. When set, a and its scales are
  // per_token_group_quant_fp8(x) with 128-wide groups, computed while a is decoded: gemm.a, gemm.a_scales and a_rows
  // are not read, and the codes are never written.
  const void* x = nullptr;
  DType x_dtype = DType::kBFloat16;
};

// Runs every job (each validated like fp8_gemm_nt, or with x like fp8_linear; an a_rows entry must index a row that
// exists).
void fp8_gemm_batch(const Fp8GemmJob* jobs, int64_t count);

}  // namespace dsv3::cpu
