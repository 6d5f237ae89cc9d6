#pragma once
// The attention step of MLA decode on the CPU (csrc/cpu/mla_decode.cpp runs the splits, writes and combines their
// results): the s_q x heads query rows of one sequence attend to a range of its 64-token KV pages with an online
// softmax whose state the caller owns. Two kernels: AVX-512 / portable fp32 (in mla_decode.cpp) and AMX tiles.

#include <cstdint>

#include "cpu/amx.h"
#include "dsv3/mla_params.h"

#if defined(DSV3_CPU_AMX) && defined(__AVX512VBMI__)
#define DSV3_MLA_AMX 1
#endif

namespace dsv3::cpu {

// State of one split's rows (ordered (query token, head)), updated page by page.
struct MlaSplitState {
  float* acc;          // [rows, head_dim_v]: sum over the keys seen of exp(score - running_max) * value
  float* running_max;  // [rows]: the largest score seen, -inf before any visible key
  float* running_sum;  // [rows]: sum over the keys seen of exp(score - running_max)
};

#if defined(DSV3_MLA_AMX)
// Rows of sequence seq against its blocks [first_block, last_block) on AMX tiles; the calling thread must be free to
// configure its tiles.
void mla_attend_amx(const MlaDecodeParams& p, int64_t seq, int32_t first_block, int32_t last_block,
                    const MlaSplitState& state);
#endif

}  // namespace dsv3::cpu
