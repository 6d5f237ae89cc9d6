#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#define DSV3_CUDA_CHECK(expression)                                                                     \
  do {                                                                                                  \
    const cudaError_t dsv3_status = (expression);                                                       \
    if (dsv3_status != cudaSuccess) {                                                                   \
      throw std::runtime_error(std::string(#expression " failed: ") + cudaGetErrorString(dsv3_status)); \
    }                                                                                                   \
  } while (0)
