// The FP8 linear layer on sm_90a: the per-token-group quantization kernel writes the activations' codes and scales
// into the caller's workspace, then the block-scaled GEMM reads them, both on the caller's stream. One entry point
// and one workspace, so the layer costs one crossing from Python and one allocation.

#include <cstdint>

#include "cuda/cuda_ops.h"

namespace dsv3::cuda {
namespace {

constexpr int64_t kAlignment = 256;  // every piece of the workspace starts on a 256-byte boundary (TMA needs 16)

int64_t aligned(int64_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

// Workspace layout: [codes: m * k bytes][scales: m * k / 128 floats][the GEMM's split-K workspace].
int64_t codes_bytes(int64_t m, int64_t k) { return aligned(m * k); }
int64_t scales_bytes(int64_t m, int64_t k) { return aligned(m * scale_blocks(k) * int64_t{sizeof(float)}); }

}  // namespace

int64_t fp8_linear_workspace_bytes(int64_t m, int64_t n, int64_t k, int num_sms) {
  return codes_bytes(m, k) + scales_bytes(m, k) + fp8_gemm_workspace_bytes(m, n, k, num_sms);
}

void fp8_linear(const Fp8LinearParams& params, std::uintptr_t workspace, int num_sms, std::uintptr_t stream) {
  validate(params);
  const int64_t m = params.m, n = params.n, k = params.k;
  if (m == 0 || n == 0) return;
  DSV3_CHECK(workspace != 0 && workspace % kAlignment == 0,
             "workspace: expected fp8_linear_workspace_bytes(...) bytes on a 256-byte boundary");
  auto* codes = reinterpret_cast<uint8_t*>(workspace);
  auto* scales = reinterpret_cast<float*>(workspace + codes_bytes(m, k));
  const std::uintptr_t gemm_workspace =
      fp8_gemm_workspace_bytes(m, n, k, num_sms) ? workspace + codes_bytes(m, k) + scales_bytes(m, k) : 0;
  per_token_group_quant_fp8({params.x, params.x_dtype, codes, scales, m, k, kScaleBlock, false}, stream);
  // the GEMM may start while the quantization finishes: it writes only the workspace
  fp8_gemm_nt({codes, scales, params.b, params.b_scales, params.out, m, n, k}, gemm_workspace, num_sms, stream,
              std::nullopt, true);
}

}  // namespace dsv3::cuda
