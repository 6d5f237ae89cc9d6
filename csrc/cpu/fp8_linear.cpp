// The FP8 linear layer on the CPU: per-token-group quantization of the activations into scratch owned by the call,
// then the block-scaled GEMM. One entry point, so a decode step's many small linear layers pay one crossing from
// Python and no tensor allocations for the quantized activations.

#include <cstdint>
#include <memory>

#include "cpu/cpu_ops.h"

namespace dsv3::cpu {

void fp8_linear(const Fp8LinearParams& params) {
  validate(params);
  const int64_t m = params.m, k = params.k;
  // Allocated per call (not kept per thread): a prefill chunk's activations can be hundreds of MB.
  const std::unique_ptr<uint8_t[]> codes(new uint8_t[m * k]);  // default-initialized: no zeroing pass
  const std::unique_ptr<float[]> scales(new float[m * scale_blocks(k)]);
  per_token_group_quant_fp8({params.x, params.x_dtype, codes.get(), scales.get(), m, k, kScaleBlock, false});
  fp8_gemm_nt({codes.get(), scales.get(), params.b, params.b_scales, params.out, m, params.n, k});
}

}  // namespace dsv3::cpu
