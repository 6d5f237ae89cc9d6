#pragma once
// sm_90a primitives as inline PTX, shared by the hand-written kernels (MLA decode, FP8 GEMM): mbarriers, TMA / bulk
// copies into shared memory, warpgroup MMA (wgmma) issue/commit/wait and shared-memory matrix descriptors, proxy
// fences, named barriers and per-warpgroup register reallocation.

#include <cuda.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace dsv3::cuda::sm90 {

__device__ __forceinline__ uint32_t smem_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// ---- mbarriers (one arrival count; the transaction count carries the bytes of the copies that complete it) ------

__device__ __forceinline__ void mbarrier_init(uint64_t* barrier, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(barrier)), "r"(arrivals) : "memory");
}

// Makes the initialized barriers visible to the async proxy (TMA completes them) before any copy is issued.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(barrier)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_address(barrier)) : "memory");
}

// Arrives on the barrier at the same shared-memory offset in CTA `cta` of this cluster. The arrival has the default
// (CTA-scope release) semantics: a .release.cluster arrival would make ptxas fence all of the thread's outstanding
// global memory traffic (MEMBAR.ALL.GPU) before it.
__device__ __forceinline__ void mbarrier_arrive_cluster(uint64_t* barrier, uint32_t cta) {
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
      "}\n" ::"r"(smem_address(barrier)),
      "r"(cta)
      : "memory");
}

__device__ __forceinline__ void mbarrier_wait(uint64_t* barrier, uint32_t phase) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(smem_address(barrier)),
      "r"(phase)
      : "memory");
}

// ---- copies into shared memory, completing on an mbarrier ---------------------------------------------------------

// One box of a 2D tensor map; coordinates are (innermost, outer) in elements.
__device__ __forceinline__ void tma_load_2d(void* destination, const CUtensorMap* map, int32_t inner, int32_t outer,
                                            uint64_t* barrier) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem_address(destination)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(inner), "r"(outer), "r"(smem_address(barrier))
      : "memory");
}

// tma_load_2d into the same shared-memory offset of every CTA of the cluster in `cta_mask`, completing on the barrier
// at the same offset in each of them.
__device__ __forceinline__ void tma_load_2d_multicast(void* destination, const CUtensorMap* map, int32_t inner,
                                                      int32_t outer, uint64_t* barrier, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, "
      "%3}], [%4], %5;" ::"r"(smem_address(destination)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(inner), "r"(outer), "r"(smem_address(barrier)), "h"(cta_mask)
      : "memory");
}

// 4 bytes into shared memory without waiting (LDGSTS); cp_async_arrive_noinc tells an mbarrier when they landed.
__device__ __forceinline__ void cp_async_4(void* destination, const void* source) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_address(destination)),
               "l"(reinterpret_cast<uint64_t>(source))
               : "memory");
}

// One arrival on the barrier once every cp_async_4 this thread issued before has landed. The arrival is one of the
// barrier's initial count (.noinc), so a barrier expecting it is initialized with one more arrival per thread.
__device__ __forceinline__ void cp_async_arrive_noinc(uint64_t* barrier) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_address(barrier)) : "memory");
}

// ---- thread block clusters -----------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t cluster_cta_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}

__device__ __forceinline__ uint32_t cluster_cta_count() {
  uint32_t count;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(count));
  return count;
}

// 16 bytes at shared-memory address `address` (16-byte aligned) of CTA `cta` of this cluster.
__device__ __forceinline__ float4 load_shared_cluster_f32x4(uint32_t address, uint32_t cta) {
  float4 value;
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %4, %5;\n"
      "ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [remote];\n"
      "}\n"
      : "=f"(value.x), "=f"(value.y), "=f"(value.z), "=f"(value.w)
      : "r"(address), "r"(cta)
      : "memory");
  return value;
}

// Every thread of every CTA of the cluster arrives and waits: orders barrier initialization before any CTA's copies
// reach its peers, and keeps a CTA's shared memory alive until its peers are done with it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Contiguous bytes (a multiple of 16, both addresses 16-byte aligned).
__device__ __forceinline__ void bulk_load(void* destination, const void* source, uint32_t bytes, uint64_t* barrier) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_address(destination)),
               "l"(reinterpret_cast<uint64_t>(source)), "r"(bytes), "r"(smem_address(barrier))
               : "memory");
}

// Asks the L2 for contiguous bytes (a multiple of 16, 16-byte aligned) without waiting for them.
__device__ __forceinline__ void prefetch_l2(const void* source, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(reinterpret_cast<uint64_t>(source)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Orders this thread's generic-proxy shared-memory writes before later async-proxy accesses (wgmma operand reads,
// TMA writes) of the same memory; a barrier then extends the order to the other threads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Named barrier `id` over `threads` threads (id 0 is __syncthreads).
__device__ __forceinline__ void named_barrier(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Arrives at named barrier `id` (of `threads` threads) without waiting: the producer side of a hand-off whose
// consumers wait with named_barrier.
__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// ---- programmatic dependent launch --------------------------------------------------------------------------------

// Lets the next kernel on the stream, if it was launched to overlap this one (cudaLaunchAttributeProgrammatic-
// StreamSerialization), start its CTAs now: they run up to their grid_dependency_wait while this grid finishes.
__device__ __forceinline__ void allow_dependent_launch() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Waits until the grids this one was launched to overlap have completed and their memory is visible; returns at
// once for an ordinary launch. A thread reads nothing those grids write before it.
__device__ __forceinline__ void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// ---- rings of shared-memory stages --------------------------------------------------------------------------------

// Position in a ring of kStages stages guarded by full/empty mbarrier pairs; the producer and the consumers walk the
// same sequence of fills, the phase bit flipping at each wrap.
template <int kStages>
struct RingPosition {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// ---- warpgroup MMA -------------------------------------------------------------------------------------------------

// Shared-memory matrix descriptor of a 128-byte-swizzled operand (PTX ISA "matrix descriptor"): start address,
// leading and stride byte offsets, all in 16-byte units; bits 62-63 = 1 selects the 128-byte swizzle. Tiles start on
// 1024-byte boundaries (one swizzle atom: 8 rows of 128 bytes), so the base-offset field stays 0 even when the start
// address moves by 32-byte K steps inside an atom (the swizzle is a function of the address bits).
__device__ __forceinline__ uint64_t sw128_descriptor(uint32_t address, uint32_t leading_bytes, uint32_t stride_bytes) {
  return (static_cast<uint64_t>((address & 0x3FFFF) >> 4)) | (static_cast<uint64_t>(leading_bytes >> 4) << 16) |
         (static_cast<uint64_t>(stride_bytes >> 4) << 32) | (uint64_t{1} << 62);
}

// descriptor + kBytes (added to the 16-byte-unit start address in the low bits). The offset is an immediate of a
// volatile add, so every k-step's descriptor is formed at its use: neither the descriptors nor the offsets get
// hoisted out of the page loop into ~100 live registers.
template <uint32_t kBytes>
__device__ __forceinline__ uint64_t advance_descriptor(uint64_t descriptor) {
  static_assert(kBytes % 16 == 0, "descriptor addresses are in 16-byte units");
  uint64_t result;
  asm volatile("add.s64 %0, %1, %2;" : "=l"(result) : "l"(descriptor), "n"(kBytes >> 4));
  return result;
}

// Calls body(std::integral_constant<int, i>) for i = 0 .. kCount - 1, so indices can feed template arguments.
template <int kCount, typename Body, int... kIndices>
__device__ __forceinline__ void static_for_impl(Body&& body, std::integer_sequence<int, kIndices...>) {
  (body(std::integral_constant<int, kIndices>{}), ...);
}
template <int kCount, typename Body>
__device__ __forceinline__ void static_for(Body&& body) {
  static_for_impl<kCount>(body, std::make_integer_sequence<int, kCount>{});
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving accesses of accumulator registers across wgmma issue / wait points.
template <int kCount>
__device__ __forceinline__ void fence_registers(float (&registers)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(registers[i])::"memory");
}

// Moves this warpgroup's register budget to kRegisters per thread (a multiple of 8 in 24..256): producers give
// registers back, MMA warpgroups take them. Every thread of the warpgroup executes it.
template <int kRegisters>
__device__ __forceinline__ void set_max_registers_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void set_max_registers_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegisters));
}

}  // namespace dsv3::cuda::sm90
