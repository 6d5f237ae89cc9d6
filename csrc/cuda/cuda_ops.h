#pragma once
// Entry points of the CUDA kernels (csrc/cuda/**). Streams cross this boundary as integers (cudaStream_t values) so
// that bindings.cpp needs no CUDA header. Each entry point validates its parameters, launches asynchronously on the
// stream and throws std::runtime_error if the launch fails.

#include <cstdint>
#include <string>

#include "dsv3/gemm_params.h"
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

// workspace: device memory of fp8_gemm_workspace_bytes(params) bytes (split-K partial sums), or 0 when that is 0.
int64_t fp8_gemm_workspace_bytes(const Fp8GemmParams& params, int num_sms);
void fp8_gemm_nt(const Fp8GemmParams& params, std::uintptr_t workspace, int num_sms, std::uintptr_t stream);

}  // namespace dsv3::cuda
