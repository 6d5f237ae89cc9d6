#pragma once
// TMA tensor maps for the hand-written sm_90a kernels, encoded on the host through the CUDA runtime's driver entry
// point (the module never links libcuda, so it still imports on machines without a GPU driver).

#include <cuda.h>

#include <cstdint>

namespace dsv3::cuda {

// A row-major 2D tensor of `rows` rows, each `row_elements` elements of `type` with rows `row_bytes` apart, read in
// boxes of box_columns x box_rows elements that land in shared memory 128-byte swizzled (box_columns must span at
// most 128 bytes). Boxes reaching past the tensor are zero-filled. `what` names the operand in errors.
CUtensorMap swizzled_rows_map(CUtensorMapDataType type, const void* base, uint64_t row_elements, uint64_t rows,
                              uint64_t row_bytes, uint32_t box_columns, uint32_t box_rows, const char* what);

}  // namespace dsv3::cuda
