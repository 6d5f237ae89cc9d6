// fused_experts on the CPU in one call. The steps are those of the unfused path, arranged so that no step writes more
// than it must:
//   1. x quantized once per token (per_token_group_quant_fp8's arithmetic), not once per (token, slot) row: every
//      expert input row is one of these, so the gate/up GEMM gathers its rows from them (Fp8GemmJob::a_rows).
//   2. the contiguous layout with alignment 1 (moe_layout_count / moe_layout_scatter): no padding rows at all.
//   3. gate/up GEMM, one job per non-empty expert (plus the shared expert over all tokens), one batch.
//   4. SiLU-and-mul, rounded to bf16, then quantized per 128 channels, in one pass over each row.
//   5. down GEMM, one batch.
//   6. the top-k weighted sum in fp32 in slot order (as moe_unpermute), plus the shared expert's output in bf16.
// Intermediates live in per-thread scratch reused across calls.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/fp8_gemm_batch.h"
#include "cpu/fp8_rows.h"
#include "cpu/scratch.h"
#include "cpu/silu_mul_quant.h"
#include "dsv3/fp8.h"
#include "dsv3/half_types.h"

namespace dsv3::cpu {
namespace {

constexpr int64_t kGroup = kMoeQuantGroup;
// Below this many elements an elementwise pass (well under a millisecond of work) runs on the calling thread: waking
// the team costs tens of microseconds on an idle machine, and on a busy one a worker that went to sleep can take a
// scheduler tick (milliseconds) to get a core back.
constexpr int64_t kParallelElements = int64_t{1} << 20;

int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// Rows [0, rows) of h ([rows, 2 * inter]) and, with a shared expert, rows [0, shared_rows) of shared_h
// ([shared_rows, 2 * shared_inter]), in one pass.
struct SiluMulQuantJob {
  const uint16_t* h;
  int64_t rows;
  int64_t inter;
  uint8_t* q;
  float* scales;
};

void silu_mul_quant(const SiluMulQuantJob& routed, const SiluMulQuantJob& shared) {
  const int64_t total = routed.rows + shared.rows;
#pragma omp parallel for schedule(static) if ((routed.rows * routed.inter + shared.rows * shared.inter) >= \
                                                  kParallelElements)
  for (int64_t i = 0; i < total; ++i) {
    const SiluMulQuantJob& job = i < routed.rows ? routed : shared;
    const int64_t r = i < routed.rows ? i : i - routed.rows;
    silu_mul_quant_row(job.h + r * 2 * job.inter, job.inter, job.q + r * job.inter,
                       job.scales + r * (job.inter / kGroup));
  }
}

// x [tokens, hidden] bf16 -> per-token, per-128-channel e4m3 codes and scales: per_token_group_quant_fp8's arithmetic.
void quantize_tokens(const uint16_t* x, int64_t tokens, int64_t hidden, uint8_t* q, float* scales) {
  const int64_t groups = tokens * (hidden / kGroup);
#pragma omp parallel for schedule(static) if (tokens * hidden >= kParallelElements)
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = scale_from_amax(group_amax<DType::kBFloat16>(x + g * kGroup, kGroup), false);
    quantize_row<DType::kBFloat16>(x + g * kGroup, q + g * kGroup, kGroup, scale);
    scales[g] = scale;
  }
}

// out[t] = bf16(sum_j w[t, j] * y[row_of[t, j]]) in fp32 from +0 in slot order (moe_unpermute's sum), then
// bf16(out[t] + shared[t]) when there is a shared expert.
void combine(const FusedMoeParams& p, const int64_t* row_of, const uint16_t* y, const uint16_t* shared_y) {
  const int64_t hidden = p.hidden;
#pragma omp parallel if (p.tokens * (p.topk + 1) * hidden >= kParallelElements)
  {
    std::vector<float> acc(hidden);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < p.topk; ++j) {
        const int64_t row = row_of[t * p.topk + j];
        if (row < 0) continue;
        const float w = p.topk_weights[t * p.topk + j];
        const uint16_t* src = y + row * hidden;
        for (int64_t h = 0; h < hidden; ++h) acc[h] = acc[h] + w * bf16_to_float(src[h]);
      }
      uint16_t* dst = p.out + t * hidden;
      if (shared_y) {
        const uint16_t* shared = shared_y + t * hidden;
        for (int64_t h = 0; h < hidden; ++h) {
          dst[h] = float_to_bf16(bf16_to_float(float_to_bf16(acc[h])) + bf16_to_float(shared[h]));
        }
      } else {
        for (int64_t h = 0; h < hidden; ++h) dst[h] = float_to_bf16(acc[h]);
      }
    }
  }
}

// A GEMM of one expert: rows [first, first + rows) of a (or, with a_rows, the rows it lists), weight `expert` of b.
Fp8GemmJob expert_job(const uint8_t* a, const float* a_scales, const int64_t* a_rows, int64_t first, int64_t rows,
                      const uint8_t* b, const float* b_scales, uint16_t* out, int64_t n, int64_t k) {
  const int64_t k_blocks = k / kGroup;
  const bool gather = a_rows != nullptr;
  return {{gather ? a : a + first * k, gather ? a_scales : a_scales + first * k_blocks, b, b_scales, out + first * n,
           rows, n, k},
          gather ? a_rows + first : nullptr};
}

}  // namespace

void fused_moe(const FusedMoeParams& p) {
  validate(p);
  const int64_t tokens = p.tokens, hidden = p.hidden, inter = p.inter, experts = p.experts;
  const bool shared = p.shared_w13 != nullptr;
  const int64_t shared_inter = shared ? p.shared_inter : 0;
  if (tokens == 0) return;

  // 1. Tokens, quantized once (unless they came quantized): q [tokens, hidden] e4m3, scales [tokens, hidden / 128].
  const int64_t q_bytes = p.x_codes ? 0 : align64(tokens * hidden);
  ScratchArray<uint8_t> token_scratch(ScratchSlot::kMoeTokens,
                                      p.x_codes ? 0 : q_bytes + tokens * (hidden / kGroup) * 4);
  const uint8_t* x_q = p.x_codes;
  const float* x_scales = p.x_scales;
  if (!p.x_codes) {
    uint8_t* codes = token_scratch.get();
    float* scales = reinterpret_cast<float*>(token_scratch.get() + q_bytes);
    quantize_tokens(p.x, tokens, hidden, codes, scales);
    x_q = codes;
    x_scales = scales;
  }

  // 2. Layout: rows grouped by expert, in (token, slot) order within an expert, without padding.
  const int64_t entries = tokens * p.topk;
  ScratchArray<int64_t> layout_scratch(ScratchSlot::kMoeLayout, 3 * entries + (experts + 1) + (experts + 1) / 2 + 1);
  int64_t* src_token = layout_scratch.get();  // [entries] (at most entries rows)
  int64_t* src_slot = src_token + entries;
  int64_t* row_of = src_slot + entries;                              // [tokens, topk]
  int64_t* offsets = row_of + entries;                               // [experts + 1]
  auto* counts = reinterpret_cast<int32_t*>(offsets + experts + 1);  // [experts]
  std::vector<int32_t> m_indices(entries);
  MoeLayoutParams layout{p.topk_idx, false,   tokens,  p.topk,  experts, false,   1,       0,       entries,
                         counts,     offsets, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  moe_layout_count(layout);
  const int64_t rows = offsets[experts];
  layout.rows = rows;
  layout.m_indices = m_indices.data();
  layout.src_token = src_token;
  layout.src_slot = src_slot;
  layout.row_of = row_of;
  moe_layout_scatter(layout);

  // Intermediates: gate/up outputs, activations (codes and scales), down outputs; routed rows then shared rows.
  const int64_t h_elements = rows * 2 * inter + tokens * 2 * shared_inter;
  ScratchArray<uint16_t> hidden_scratch(ScratchSlot::kMoeHidden, h_elements);
  uint16_t* h = hidden_scratch.get();
  uint16_t* shared_h = h + rows * 2 * inter;
  const int64_t a_bytes = align64(rows * inter + tokens * shared_inter);
  ScratchArray<uint8_t> act_scratch(ScratchSlot::kMoeActivations,
                                    a_bytes + (rows * inter + tokens * shared_inter) / kGroup * 4);
  uint8_t* a_q = act_scratch.get();
  uint8_t* shared_a_q = a_q + rows * inter;
  float* a_scales = reinterpret_cast<float*>(act_scratch.get() + a_bytes);
  float* shared_a_scales = a_scales + rows * (inter / kGroup);
  ScratchArray<uint16_t> down_scratch(ScratchSlot::kMoeDown, (rows + (shared ? tokens : 0)) * hidden);
  uint16_t* y = down_scratch.get();
  uint16_t* shared_y = shared ? y + rows * hidden : nullptr;

  // 3. gate/up: expert e's rows gather their tokens.
  const int64_t w13_expert = 2 * inter * hidden, w13_scales_expert = (2 * inter / kGroup) * (hidden / kGroup);
  std::vector<Fp8GemmJob> jobs;
  jobs.reserve(experts + 1);
  for (int64_t e = 0; e < experts; ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    jobs.push_back(expert_job(x_q, x_scales, src_token, offsets[e], offsets[e + 1] - offsets[e], p.w13 + e * w13_expert,
                              p.w13_scales + e * w13_scales_expert, h, 2 * inter, hidden));
  }
  if (shared) {
    jobs.push_back(expert_job(x_q, x_scales, nullptr, 0, tokens, p.shared_w13, p.shared_w13_scales, shared_h,
                              2 * shared_inter, hidden));
  }
  fp8_gemm_batch(jobs.data(), static_cast<int64_t>(jobs.size()));

  // 4. SiLU-and-mul + quantization.
  silu_mul_quant({h, rows, inter, a_q, a_scales},
                 {shared_h, shared ? tokens : 0, shared ? shared_inter : 1, shared_a_q, shared_a_scales});

  // 5. down.
  const int64_t w2_expert = hidden * inter, w2_scales_expert = (hidden / kGroup) * (inter / kGroup);
  jobs.clear();
  for (int64_t e = 0; e < experts; ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    jobs.push_back(expert_job(a_q, a_scales, nullptr, offsets[e], offsets[e + 1] - offsets[e], p.w2 + e * w2_expert,
                              p.w2_scales + e * w2_scales_expert, y, hidden, inter));
  }
  if (shared) {
    jobs.push_back(expert_job(shared_a_q, shared_a_scales, nullptr, 0, tokens, p.shared_w2, p.shared_w2_scales,
                              shared_y, hidden, shared_inter));
  }
  fp8_gemm_batch(jobs.data(), static_cast<int64_t>(jobs.size()));

  // 6. Weighted combine (+ shared expert).
  combine(p, row_of, y, shared_y);
}

}  // namespace dsv3::cpu
