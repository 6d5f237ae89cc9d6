// get_mla_metadata on the GPU: the split-KV partition of dsv3/mla_schedule.h computed on the device (the same code
// as the CPU, so both produce the same partition), without a host synchronization.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "dsv3/mla_params.h"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kStagedSequences = 8192;  // sequence lengths staged in shared memory (32 KiB)

// The partition is a sequential pass: the block stages cache_seqlens in shared memory in parallel (one coalesced
// read instead of two dependent global loads per sequence), then one thread runs it.
__global__ void __launch_bounds__(kThreads) mla_schedule_kernel(const MlaScheduleParams p) {
  __shared__ int32_t staged[kStagedSequences];
  const bool stage = p.batch <= kStagedSequences;
  if (stage) {
    for (int64_t i = threadIdx.x; i < p.batch; i += kThreads) staged[i] = p.cache_seqlens[i];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    compute_mla_schedule(stage ? staged : p.cache_seqlens, p.batch, p.num_parts, p.metadata, p.split_offsets);
  }
}

}  // namespace

void mla_schedule(const MlaScheduleParams& params, std::uintptr_t stream) {
  validate(params);
  mla_schedule_kernel<<<1, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(params);
  DSV3_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv3::cuda
