#pragma once
// Split-KV work partition of MLA decode, shared by the CPU kernel and the GPU (host+device): the same cache_seqlens
// and partition count give the same splits on both, so both backends compute exactly the same partial sums.
//
// The work of a batch is a row of 64-token KV blocks per sequence. It is cut into `num_parts` contiguous pieces of
// about equal cost (a block costs 1, starting a piece of a sequence costs kMlaSplitOverheadBlocks: loading its
// queries and writing a partial result). A piece of a sequence is a "split"; a sequence cut into several splits is
// merged by the combine step: lse = log sum_i exp(lse_i), out = sum_i exp(lse_i - lse) * out_i.
//
// Outputs:
//   metadata      int32 [num_parts, 8]: {begin_seq, begin_block, end_seq, end_block, first_split, 0, 0, 0}; the
//                 part covers blocks [begin_block, ...) of begin_seq through blocks [..., end_block) of end_seq
//                 (inclusive sequence range); an empty part has begin_seq > end_seq.
//   split_offsets int32 [batch + 1]: sequence i owns splits [split_offsets[i], split_offsets[i + 1]); a sequence
//                 with no KV owns none. Split ids index the partial-result workspace, which needs at most
//                 batch + num_parts rows (each part boundary cuts at most one sequence in two).

#include <cstdint>

#include "dsv3/macros.h"

namespace dsv3 {

constexpr int kMlaPageSize = 64;
constexpr int kMlaLatentDim = 512;
constexpr int kMlaRopeDim = 64;
constexpr int kMlaHeadDim = kMlaLatentDim + kMlaRopeDim;      // 576
constexpr int kMlaFp8RowBytes = kMlaLatentDim + 16 + 2 * 64;  // 656: e4m3 latent, 4 fp32 scales, bf16 rope
constexpr int kMlaMetadataInts = 8;
constexpr int kMlaSplitOverheadBlocks = 5;

DSV3_HOST_DEVICE int32_t mla_blocks(int32_t seqlen) { return (seqlen + kMlaPageSize - 1) / kMlaPageSize; }

// Upper bound of the splits of any schedule: the rows of the partial-result workspace.
DSV3_HOST_DEVICE int64_t mla_max_splits(int64_t batch, int64_t num_parts) { return batch + num_parts; }

// Sequential O(batch) pass; on the GPU one thread runs it (a decode step has at most a few thousand sequences).
DSV3_HOST_DEVICE void compute_mla_schedule(const int32_t* cache_seqlens, int64_t batch, int64_t num_parts,
                                           int32_t* metadata, int32_t* split_offsets) {
  int64_t total_cost = 0;
  for (int64_t i = 0; i < batch; ++i) {
    const int32_t blocks = mla_blocks(cache_seqlens[i]);
    if (blocks > 0) total_cost += blocks + kMlaSplitOverheadBlocks;
  }
  // A part's budget: its share of the total plus the overhead of the one extra split its boundary may create (and
  // so always at least one block after the overhead: every step below makes progress).
  const int64_t quota = (total_cost + num_parts - 1) / num_parts + kMlaSplitOverheadBlocks;

  int64_t part = 0, budget = quota;
  int32_t split = 0;
  bool part_open = false;
  auto open_part = [&](int64_t seq, int32_t block) {
    int32_t* row = metadata + part * kMlaMetadataInts;
    row[0] = static_cast<int32_t>(seq);
    row[1] = block;
    row[4] = split;
    part_open = true;
  };
  auto close_part = [&](int64_t seq, int32_t end_block) {
    int32_t* row = metadata + part * kMlaMetadataInts;
    row[2] = static_cast<int32_t>(seq);
    row[3] = end_block;
    ++part;
    budget = quota;
    part_open = false;
  };
  for (int64_t i = 0; i < batch; ++i) {
    split_offsets[i] = split;
    const int32_t blocks = mla_blocks(cache_seqlens[i]);
    int32_t start = 0;
    while (start < blocks) {
      if (!part_open) open_part(i, start);
      const bool last_part = part == num_parts - 1;
      const int64_t affordable = budget - kMlaSplitOverheadBlocks;
      int32_t take = blocks - start;
      if (!last_part && affordable < take) take = static_cast<int32_t>(affordable > 1 ? affordable : 1);
      budget -= kMlaSplitOverheadBlocks + take;
      start += take;
      ++split;
      if (!last_part && budget <= kMlaSplitOverheadBlocks) close_part(i, start);
    }
  }
  split_offsets[batch] = split;
  if (part_open) close_part(batch - 1, mla_blocks(cache_seqlens[batch - 1]));
  for (; part < num_parts; ++part) {  // parts left without work
    int32_t* row = metadata + part * kMlaMetadataInts;
    row[0] = 1;
    row[1] = 0;
    row[2] = 0;
    row[3] = 0;
    row[4] = split;
  }
  for (int64_t p = 0; p < num_parts; ++p) {
    for (int j = 5; j < kMlaMetadataInts; ++j) metadata[p * kMlaMetadataInts + j] = 0;
  }
}

}  // namespace dsv3
