#include <cuda_runtime_api.h>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"

namespace dsv3::cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later calls start clean
    return 0;
  }
  return count;
}

void set_device(int index) { DSV3_CUDA_CHECK(cudaSetDevice(index)); }

int runtime_version() { return CUDART_VERSION; }

}  // namespace dsv3::cuda
