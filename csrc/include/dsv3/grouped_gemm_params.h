#pragma once
// Parameters of the grouped FP8 GEMMs of MoE layers (DeepGEMM's m-grouped semantics): every group g multiplies its
// rows of `a` by its own weight b[g] ([n, k], 128x128 block scales).
//
//   contiguous  a [m_sum, k]; row r belongs to group m_indices[r] (-1: a padding row, its output row is set to 0).
//               The CUDA kernel needs each group's rows to be one contiguous run (as moe_contiguous_layout makes
//               them); the CPU kernel accepts any order.
//   masked      a [groups, m_max, k]; group g uses its first masked_m[g] rows (read on the device, no host
//               synchronization); output rows at and beyond masked_m[g] are left unwritten.

#include <algorithm>
#include <cstdint>

#include "dsv3/check.h"
#include "dsv3/gemm_params.h"

namespace dsv3 {

enum class GroupedLayout : int32_t { kContiguous = 0, kMasked = 1 };

struct GroupedFp8GemmParams {
  GroupedLayout layout;
  const uint8_t* a;          // contiguous: [m_sum, k]; masked: [groups, m_max, k]; e4m3
  const float* a_scales;     // a's rows x [ceil(k / 128)]
  const uint8_t* b;          // [groups, n, k] e4m3
  const float* b_scales;     // [groups, ceil(n / 128), ceil(k / 128)]
  uint16_t* out;             // a's rows x [n] bf16
  const int32_t* m_indices;  // contiguous: [m_sum], group of each row or -1
  const int32_t* masked_m;   // masked: [groups], valid rows of each group
  int64_t groups;
  int64_t m;  // contiguous: m_sum; masked: m_max
  int64_t n;
  int64_t k;
  int64_t expected_m = 0;  // masked: the typical masked_m, a scheduling hint that never changes the result (0: m_max)
};

// Masked layout: the rows a group typically computes, expected_m within [1, m_max] (m_max when it is not given).
inline int64_t expected_rows(const GroupedFp8GemmParams& p) {
  return p.expected_m > 0 ? std::min(p.expected_m, p.m) : p.m;
}

inline void validate(const GroupedFp8GemmParams& p) {
  DSV3_CHECK(p.groups >= 1, "b: expected at least one group, got ", p.groups);
  DSV3_CHECK(p.m >= 0 && p.n >= 1 && p.k >= 1, "bad grouped GEMM shape m=", p.m, " n=", p.n, " k=", p.k);
  DSV3_CHECK(p.b && p.b_scales, "b/b scales: null pointer");
  if (p.m == 0) return;  // no rows: nothing of a, out or the row indices is read
  DSV3_CHECK(p.a && p.a_scales && p.out, "a/a scales/out: null pointer");
  DSV3_CHECK(p.layout == GroupedLayout::kContiguous ? p.m_indices != nullptr : p.masked_m != nullptr,
             p.layout == GroupedLayout::kContiguous ? "m_indices" : "masked_m", ": null pointer");
}

}  // namespace dsv3
