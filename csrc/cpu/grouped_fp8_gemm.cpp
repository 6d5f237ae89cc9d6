// Grouped (MoE) FP8 GEMMs on the CPU: every run of consecutive rows that share a group (contiguous layout) or every
// group's first masked_m rows (masked layout) is one dense GEMM against that group's weight, and all of them run as
// one batch (fp8_gemm_batch), so the thread team splits (group, row block, column block) items across groups.

#include <cstring>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/fp8_gemm_batch.h"

namespace dsv3::cpu {
namespace {

Fp8GemmJob group_gemm(const GroupedFp8GemmParams& p, int64_t group, int64_t first_row, int64_t rows) {
  const int64_t k_blocks = scale_blocks(p.k), n_blocks = scale_blocks(p.n);
  return {{p.a + first_row * p.k, p.a_scales + first_row * k_blocks, p.b + group * p.n * p.k,
           p.b_scales + group * n_blocks * k_blocks, p.out + first_row * p.n, rows, p.n, p.k},
          nullptr};
}

void run_contiguous(const GroupedFp8GemmParams& p) {
  for (int64_t row = 0; row < p.m; ++row) {
    DSV3_CHECK(p.m_indices[row] >= -1 && p.m_indices[row] < p.groups, "m_indices[", row, "]=", p.m_indices[row],
               ": expected -1 (padding) or a group in [0, ", p.groups, ")");
  }
  std::vector<Fp8GemmJob> jobs;
  for (int64_t start = 0; start < p.m;) {
    const int32_t group = p.m_indices[start];
    int64_t end = start + 1;
    while (end < p.m && p.m_indices[end] == group) ++end;
    if (group < 0) {
      std::memset(p.out + start * p.n, 0, (end - start) * p.n * sizeof(uint16_t));
    } else {
      jobs.push_back(group_gemm(p, group, start, end - start));
    }
    start = end;
  }
  fp8_gemm_batch(jobs.data(), static_cast<int64_t>(jobs.size()));
}

void run_masked(const GroupedFp8GemmParams& p) {
  for (int64_t group = 0; group < p.groups; ++group) {
    DSV3_CHECK(p.masked_m[group] >= 0 && p.masked_m[group] <= p.m, "masked_m[", group, "]=", p.masked_m[group],
               ": expected 0..", p.m);
  }
  std::vector<Fp8GemmJob> jobs;
  for (int64_t group = 0; group < p.groups; ++group) {
    if (p.masked_m[group] > 0) jobs.push_back(group_gemm(p, group, group * p.m, p.masked_m[group]));
  }
  fp8_gemm_batch(jobs.data(), static_cast<int64_t>(jobs.size()));
}

}  // namespace

void grouped_fp8_gemm(const GroupedFp8GemmParams& params) {
  validate(params);
  if (params.layout == GroupedLayout::kContiguous) {
    run_contiguous(params);
  } else {
    run_masked(params);
  }
}

}  // namespace dsv3::cpu
