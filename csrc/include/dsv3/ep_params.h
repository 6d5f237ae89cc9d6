#pragma once
// Parameters of the expert-parallel packing kernels (dsv3.ep): byte-row copies between the tensors a rank sends or
// receives and the single uint8 buffer that crosses all_to_all_single, and the reduction of returned rows at their
// source tokens. Rows are addressed as bytes (row stride and column offset in bytes), so one kernel moves FP8
// values, bf16/fp32 activations, scales and routing alike. Pointers are raw host or device addresses checked by
// dsv3.ops.ep; validate() re-checks what keeps a kernel in bounds.

#include <cstdint>

#include "dsv3/check.h"
#include "dsv3/dtype.h"

namespace dsv3 {

// dst row d(i) bytes [dst_offset, dst_offset + row_bytes) = src row s(i) bytes [src_offset, src_offset + row_bytes)
// for i in [0, rows), with s(i) = src_index ? src_index[i] : i and d(i) = dst_index ? dst_index[i] : i. A row whose
// s(i) or d(i) is -1 is skipped (a destination row nobody writes keeps its contents). Destination rows must be
// distinct (where not -1): rows are copied in parallel.
struct EpCopyRowsParams {
  const uint8_t* src;        // [src_rows, src_stride] bytes
  uint8_t* dst;              // [dst_rows, dst_stride] bytes
  const int64_t* src_index;  // [rows] source row of each copy, -1 = skip; null = row i
  const int64_t* dst_index;  // [rows] destination row of each copy, -1 = skip; null = row i
  int64_t rows;
  int64_t src_rows;
  int64_t dst_rows;
  int64_t src_stride;  // bytes from one source row to the next
  int64_t dst_stride;
  int64_t src_offset;  // first byte of the copied span within a source row
  int64_t dst_offset;
  int64_t row_bytes;  // bytes copied per row

  void validate() const {
    DSV3_CHECK(rows >= 0 && src_rows >= 0 && dst_rows >= 0 && row_bytes >= 0, "ep_copy_rows: negative size");
    DSV3_CHECK(src_offset >= 0 && src_offset + row_bytes <= src_stride, "ep_copy_rows: source span [", src_offset, ", ",
               src_offset + row_bytes, ") outside a ", src_stride, "-byte row");
    DSV3_CHECK(dst_offset >= 0 && dst_offset + row_bytes <= dst_stride, "ep_copy_rows: destination span [", dst_offset,
               ", ", dst_offset + row_bytes, ") outside a ", dst_stride, "-byte row");
    DSV3_CHECK(src_index || rows <= src_rows, "ep_copy_rows: ", rows, " rows from a ", src_rows, "-row source");
    DSV3_CHECK(dst_index || rows <= dst_rows, "ep_copy_rows: ", rows, " rows into a ", dst_rows, "-row destination");
  }
};

// out[token[i], c] (fp32, zeroed first) += value c of row i, for every row i in order, c in [0, cols). Rows come
// grouped by source rank (rank_offsets) and a source returns each token at most once, so every output element is a
// chain of ordered fp32 additions in rank order starting from +0 — the same bits whatever the parallel split.
struct EpCombineParams {
  const uint8_t* src;  // [rows, src_stride] bytes; row i holds cols values of src_dtype from byte src_offset
  DType src_dtype;
  const int64_t* token;         // [rows] source token of each row, in [0, tokens)
  const int64_t* rank_offsets;  // host [num_ranks + 1]: rows [rank_offsets[r], rank_offsets[r + 1]) came from rank r
  float* out;                   // [tokens, cols]
  int64_t rows;
  int64_t tokens;
  int64_t cols;
  int64_t num_ranks;
  int64_t src_stride;
  int64_t src_offset;

  void validate() const {
    DSV3_CHECK(rows >= 0 && tokens >= 0 && cols >= 0 && num_ranks >= 1, "ep_combine_reduce: negative size");
    DSV3_CHECK(src_offset >= 0 && src_offset + cols * dtype_size(src_dtype) <= src_stride,
               "ep_combine_reduce: values [", src_offset, ", ", src_offset + cols * dtype_size(src_dtype),
               ") outside a ", src_stride, "-byte row");
    DSV3_CHECK(src_offset % dtype_size(src_dtype) == 0 && src_stride % dtype_size(src_dtype) == 0,
               "ep_combine_reduce: ", dtype_name(src_dtype), " values at byte ", src_offset, " of ", src_stride,
               "-byte rows are not aligned to their size");
    DSV3_CHECK(rank_offsets[0] == 0 && rank_offsets[num_ranks] == rows,
               "ep_combine_reduce: rank_offsets must run from 0 to rows=", rows);
    for (int64_t r = 0; r < num_ranks; ++r)
      DSV3_CHECK(rank_offsets[r] <= rank_offsets[r + 1], "ep_combine_reduce: rank_offsets must not decrease");
  }
};

}  // namespace dsv3
