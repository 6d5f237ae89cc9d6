// TMA tensor map encoding (cuda/tensor_map.h).

#include "cuda/tensor_map.h"

#include <cuda_runtime_api.h>

#include <mutex>
#include <stdexcept>
#include <string>

namespace dsv3::cuda {
namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  static EncodeTiled function = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* address = nullptr;
    cudaDriverEntryPointQueryResult status{};
#if CUDART_VERSION >= 12050
    const cudaError_t error =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &address, 12000, cudaEnableDefault, &status);
#else
    const cudaError_t error = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &address, cudaEnableDefault, &status);
#endif
    if (error == cudaSuccess && status == cudaDriverEntryPointSuccess) {
      function = reinterpret_cast<EncodeTiled>(address);
    } else {
      cudaGetLastError();
    }
  });
  if (function == nullptr) throw std::runtime_error("cuTensorMapEncodeTiled is not available from the CUDA driver");
  return function;
}

}  // namespace

CUtensorMap swizzled_rows_map(CUtensorMapDataType type, const void* base, uint64_t row_elements, uint64_t rows,
                              uint64_t row_bytes, uint32_t box_columns, uint32_t box_rows, const char* what) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {row_elements, rows};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_columns, box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result = encode_tiled()(&map, type, 2, const_cast<void*>(base), dims, strides, box, element_strides,
                                         CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                         CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result != CUDA_SUCCESS) {
    throw std::runtime_error(std::string("cuTensorMapEncodeTiled failed for ") + what + " (error " +
                             std::to_string(result) + ")");
  }
  return map;
}

}  // namespace dsv3::cuda
