// Expert-parallel packing on the CPU: byte-row gathers/scatters between tensors and the exchange buffer, and the
// rank-ordered fp32 reduction of combined rows. Bit-exact with the torch index ops they replace (index_select + cat,
// column slices, index_add_ per source rank into fp32 zeros).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/fp8_rows.h"
#include "dsv3/ep_params.h"

namespace dsv3::cpu {
namespace {

// Copies moving fewer bytes than this stay on the calling thread: waking the OpenMP team costs more (decode).
constexpr int64_t kParallelBytes = 1 << 20;

// Every index in [-1, bound); with `distinct`, no value >= 0 twice (parallel writes to one row would race).
void check_rows(const int64_t* index, int64_t n, int64_t bound, bool distinct, const char* name) {
  std::vector<bool> seen(distinct ? static_cast<size_t>(bound) : 0, false);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = index[i];
    DSV3_CHECK(v >= -1 && v < bound, name, ": values must lie in [-1, ", bound, "), got ", v, " at ", i);
    if (distinct && v >= 0) {
      DSV3_CHECK(!seen[v], name, ": row ", v, " appears twice (at ", i, ")");
      seen[v] = true;
    }
  }
}

// Columns per task of the reduction: each task adds every row's slice of its columns, in row order, so the order of
// additions of an element never depends on the threads, and one parallel region covers the whole call.
constexpr int64_t kColumnChunk = 256;

template <DType kType>
void add_rows(const EpCombineParams& p) {
  using Storage = typename Element<kType>::Storage;
  const int64_t chunks = (p.cols + kColumnChunk - 1) / kColumnChunk;
#pragma omp parallel for schedule(static) if (p.rows * p.cols * 4 >= kParallelBytes)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t first = chunk * kColumnChunk, last = std::min(first + kColumnChunk, p.cols);
    for (int64_t i = 0; i < p.rows; ++i) {
      const auto* values = reinterpret_cast<const Storage*>(p.src + i * p.src_stride + p.src_offset);
      float* sums = p.out + p.token[i] * p.cols;
      for (int64_t c = first; c < last; ++c) sums[c] += Element<kType>::load(values[c]);
    }
  }
}

}  // namespace

void ep_copy_rows(const EpCopyRowsParams& p) {
  p.validate();
  if (p.src_index) check_rows(p.src_index, p.rows, p.src_rows, false, "src_index");
  if (p.dst_index) check_rows(p.dst_index, p.rows, p.dst_rows, true, "dst_index");
#pragma omp parallel for schedule(static) if (p.rows * p.row_bytes >= kParallelBytes)
  for (int64_t i = 0; i < p.rows; ++i) {
    const int64_t s = p.src_index ? p.src_index[i] : i;
    const int64_t d = p.dst_index ? p.dst_index[i] : i;
    if (s < 0 || d < 0) continue;
    std::memcpy(p.dst + d * p.dst_stride + p.dst_offset, p.src + s * p.src_stride + p.src_offset, p.row_bytes);
  }
}

void ep_combine_reduce(const EpCombineParams& p) {
  p.validate();
  for (int64_t r = 0; r < p.num_ranks; ++r) {
    const int64_t first = p.rank_offsets[r];
    check_rows(p.token + first, p.rank_offsets[r + 1] - first, p.tokens, true, "token");
    for (int64_t i = first; i < p.rank_offsets[r + 1]; ++i)
      DSV3_CHECK(p.token[i] >= 0, "token: -1 at row ", i, " (every returned row has a source token)");
  }
  std::fill(p.out, p.out + p.tokens * p.cols, 0.0f);
  // Rows are in rank order, so every element sees its additions in rank order.
  dispatch_float_type(p.src_dtype, [&](auto type) { add_rows<decltype(type)::value>(p); });
}

}  // namespace dsv3::cpu
