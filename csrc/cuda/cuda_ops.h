#pragma once
// Entry points of the CUDA kernels (csrc/cuda/**). Streams cross this boundary as integers (cudaStream_t values) so
// that bindings.cpp needs no CUDA header. Each entry point validates its parameters, launches asynchronously on the
// stream and throws std::runtime_error if the launch fails.

#include <cstdint>
#include <optional>
#include <string>

#include "dsv3/ep_params.h"
#include "dsv3/gemm_params.h"
#include "dsv3/gemm_schedule.h"
#include "dsv3/grouped_gemm_params.h"
#include "dsv3/layer_params.h"
#include "dsv3/mla_params.h"
#include "dsv3/moe_params.h"
#include "dsv3/quant_params.h"

namespace dsv3::cuda {

// Number of visible devices; 0 when there is no driver or no GPU (never throws).
int device_count();
// Makes `index` the current device of this module's CUDA runtime for the calling thread.
void set_device(int index);
// Runtime version the module was built with, e.g. 13000.
int runtime_version();

void per_token_group_quant_fp8(const TokenGroupQuantParams& params, std::uintptr_t stream);
void per_block_quant_fp8(const BlockQuantParams& params, std::uintptr_t stream);
void dequant_fp8_block(const BlockDequantParams& params, std::uintptr_t stream);
void silu_and_mul_quant_fp8(const SiluMulQuantParams& params, std::uintptr_t stream);

// Device memory (bytes) the GEMM needs for split-K partial sums on a GPU with num_sms SMs; 0 when it needs none.
// forced: a schedule to run instead of choose_fp8_gemm_schedule's (benchmark sweeps compare them); the same one must
// then be given to fp8_gemm_nt.
int64_t fp8_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, int num_sms,
                                 const std::optional<Fp8GemmSchedule>& forced = std::nullopt);
// workspace: fp8_gemm_workspace_bytes(...) bytes of device memory (any content), or 0 when that is 0.
// overlap_predecessor: the kernel before it on the stream may still be finishing when the GEMM starts (programmatic
// dependent launch; the decode kernel asks for the weights before it waits for that kernel's output), so that
// kernel must write nothing of b or b_scales and must itself have been launched in stream order (so that whatever
// wrote b is done): fp8_linear's own quantization. (After a memset or a copy the launch is in stream order anyway.)
void fp8_gemm_nt(const Fp8GemmParams& params, std::uintptr_t workspace, int num_sms, std::uintptr_t stream,
                 const std::optional<Fp8GemmSchedule>& forced = std::nullopt, bool overlap_predecessor = false);
// Quantization + GEMM: workspace holds the quantized activations and the GEMM's own workspace.
int64_t fp8_linear_workspace_bytes(int64_t m, int64_t n, int64_t k, int num_sms);
void fp8_linear(const Fp8LinearParams& params, std::uintptr_t workspace, int num_sms, std::uintptr_t stream);

// Grouped (MoE) GEMM: workspace holds the per-group argument arrays the device builds, plus CUTLASS's own.
int64_t grouped_fp8_gemm_workspace_bytes(int64_t groups, int num_sms);
void grouped_fp8_gemm(const GroupedFp8GemmParams& params, std::uintptr_t workspace, int num_sms, std::uintptr_t stream);
void rms_norm(const RmsNormParams& params, std::uintptr_t stream);
void apply_rope(const RopeParams& params, std::uintptr_t stream);
void grouped_topk(const GroupedTopkParams& params, std::uintptr_t stream);
// Layouts without a host synchronization: counting zeroes params.errors and fills the workspace, counts and
// offsets; placing fills the rows. A slot whose expert lies outside [-1, E) takes no row and counts in errors[0];
// masked, a slot past an expert's max_m takes no row and counts in errors[1]. Contiguous rows past M_sum stay -1.
void moe_layout_count(const MoeLayoutParams& params, std::uintptr_t stream);
void moe_layout_scatter(const MoeLayoutParams& params, std::uintptr_t stream);
// Rows whose src_token lies outside [0, tokens) are zero rows; slots whose row_of lies outside [0, rows) add nothing.
void moe_permute(const MoePermuteParams& params, std::uintptr_t stream);
void moe_unpermute(const MoeUnpermuteParams& params, std::uintptr_t stream);
// Expert-parallel packing. Index values outside their range skip the row (as -1 does); destinations (copy) and the
// tokens of one rank (combine) must be distinct. params.rank_offsets is read on the host: one launch per rank.
void ep_copy_rows(const EpCopyRowsParams& params, std::uintptr_t stream);
void ep_combine_reduce(const EpCombineParams& params, std::uintptr_t stream);

// MLA decode over the paged latent cache. mla_schedule runs dsv3/mla_schedule.h on the device (one thread; the
// partition equals the CPU's). mla_decode needs partial_out / partial_lse workspaces of batch + num_parts rows; it
// never reads or writes out of bounds whatever block_table, cache_seqlens or the schedule say: a page id outside
// the cache, a length beyond the block table or a schedule that does not match cache_seqlens turns the affected
// sequence's out and lse into NaN (the CPU kernel raises instead; checking here would need a host sync).
void mla_schedule(const MlaScheduleParams& params, std::uintptr_t stream);
void mla_decode(const MlaDecodeParams& params, std::uintptr_t stream);
// Tokens whose slot lies outside the cache are skipped (the CPU kernel raises); two tokens sharing a slot race.
void mla_append_kv(const MlaAppendParams& params, std::uintptr_t stream);

}  // namespace dsv3::cuda
