#pragma once

#if defined(__CUDACC__)
#define DSV3_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DSV3_HOST_DEVICE inline
#endif
