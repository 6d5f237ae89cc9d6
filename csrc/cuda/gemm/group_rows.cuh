#pragma once
// The rows each group of a grouped FP8 GEMM computes, found on the device (no host synchronization): for the
// contiguous layout the extent of each group's run of rows in m_indices, for the masked one the first masked_m[g]
// rows of slab g. Shared by the CUTLASS grouped kernel and the hand-written overlap kernel.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dsv3/grouped_gemm_params.h"

namespace dsv3::cuda {

struct GroupRows {
  int32_t* first_row;  // contiguous: first row of each group (INT_MAX when it has none)
  int32_t* last_row;   // contiguous: last row of each group (-1 when it has none)
  int32_t* rows;       // rows of each group: the count, then the rows the GEMM computes (0 for a broken layout)
};

// Contiguous layout: fills first_row, last_row and the row counts from m_indices (enqueued on `stream`).
void find_contiguous_group_rows(const GroupedFp8GemmParams& p, GroupRows g, int num_sms, cudaStream_t stream);

// Contiguous layout: sets to 0 the output rows no group computes (padding, or a group whose rows are not one run).
void zero_uncomputed_rows(const GroupedFp8GemmParams& p, const int32_t* rows, cudaStream_t stream);

// One group's first row of a and the rows it computes; stores the latter in g.rows. A contiguous-layout group whose
// rows do not form one run computes none (its rows are zeroed like padding) rather than a product over foreign rows.
__device__ inline void resolve_group_rows(const GroupedFp8GemmParams& p, GroupRows g, int64_t group, int64_t& first,
                                          int64_t& rows) {
  if (p.layout == GroupedLayout::kContiguous) {
    rows = g.rows[group];
    first = rows > 0 ? g.first_row[group] : 0;
    if (rows > 0 && g.last_row[group] - first + 1 != rows) rows = 0;
  } else {
    rows = min(max(p.masked_m[group], 0), static_cast<int32_t>(p.m));  // never past the group's slab
    first = group * p.m;
  }
  g.rows[group] = static_cast<int32_t>(rows);
}

}  // namespace dsv3::cuda
