#pragma once
// Numerics of the noaux_tc router shared by the CPU and CUDA kernels, so that both pick the same experts and give
// the same weights bit for bit.
//
// dsv3.reference.moe.grouped_topk takes its sigmoid from torch, whose vectorized CPU kernel computes
// 1 / (1 + exp(-x)) with SLEEF's expf (1-ulp variant, fused multiply-adds): a Cody-Waite reduction by ln 2 and a
// degree-6 polynomial. router_exp evaluates the same operations in the same order, so it reproduces those bits
// (torch's scalar fallback, used for the few elements past the last full vector of a contiguous tensor, calls libm's
// expf instead and may differ from it by one ulp).

#include <cmath>
#include <cstdint>

#include "dsv3/fp8.h"
#include "dsv3/macros.h"

namespace dsv3 {

DSV3_HOST_DEVICE float fused_multiply_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

DSV3_HOST_DEVICE float round_to_nearest_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::rint(x);
#endif
}

// 2^q for the integer q in [-126, 127], built from its exponent bits.
DSV3_HOST_DEVICE float power_of_two(int q) { return bits_to_float(static_cast<uint32_t>(q + 127) << 23); }

// e^x: x = q ln2 + s with |s| <= ln2 / 2, e^s from its Taylor-like polynomial, times 2^q in two halves (q may leave
// the normal exponent range by one). Below -104 the result is 0, above 100 it is inf, NaN stays NaN.
DSV3_HOST_DEVICE float router_exp(float x) {
  float qf = round_to_nearest_even(x * 1.442695040888963407359924681001892137426645954152985934135449406931f);
  // Only |x| <= 104 reaches the result; clamping keeps the integer conversion defined for inf and NaN inputs.
  qf = qf > 200.0f ? 200.0f : (qf >= -200.0f ? qf : -200.0f);
  const int q = static_cast<int>(qf);
  float s = fused_multiply_add(qf, -0.693145751953125f, x);   // ln2 split in a high part exact in fp32 ...
  s = fused_multiply_add(qf, -1.428606765330187045e-06f, s);  // ... and the low remainder
  float u = 0.000198527617612853646278381f;
  u = fused_multiply_add(u, s, 0.00139304355252534151077271f);
  u = fused_multiply_add(u, s, 0.00833336077630519866943359f);
  u = fused_multiply_add(u, s, 0.0416664853692054748535156f);
  u = fused_multiply_add(u, s, 0.166666671633720397949219f);
  u = fused_multiply_add(u, s, 0.5f);
  u = 1.0f + fused_multiply_add(s * s, u, s);
  u = u * power_of_two(q >> 1) * power_of_two(q - (q >> 1));
  // selects rather than branches, so that CPU loops over this vectorize
  u = x < -104.0f ? 0.0f : u;
  return x > 100.0f ? INFINITY : u;
}

DSV3_HOST_DEVICE float router_sigmoid(float logit) { return 1.0f / (1.0f + router_exp(-logit)); }

// The order of every selection step of the router: higher value first, the lower index on equal values.
DSV3_HOST_DEVICE bool ranks_before(float value, int index, float other_value, int other_index) {
  return value > other_value || (value == other_value && index < other_index);
}

}  // namespace dsv3
