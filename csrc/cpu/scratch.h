#pragma once
// Per-thread reusable scratch memory for the CPU kernels. A kernel that needs megabytes of scratch per call (decoded
// activations, MoE intermediates) would otherwise pay a page fault per 4 KiB of a fresh allocation on every call,
// which at decode sizes costs as much as the arithmetic. A ScratchArray borrows its slot's cached buffer from the
// calling thread for its lifetime and gives it back afterwards; buffers above kRetainBytes are freed instead, so a
// one-off large prefill does not pin its memory.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <new>
#include <utility>

namespace dsv3::cpu {

// One slot per buffer that can be alive at the same time on a thread (a slot is never borrowed twice at once).
enum class ScratchSlot : int {
  kGemmA,       // decoded / re-laid activations of the FP8 GEMMs
  kGemmScales,  // their scales
  kMoeTokens,   // fused MoE: quantized tokens and their scales
  kMoeLayout,   // fused MoE: layout indices
  kMoeHidden,   // fused MoE: gate/up GEMM output
  kMoeActivations,
  kMoeDown,  // fused MoE: down GEMM output
  kCount,
};

constexpr size_t kRetainBytes = size_t{256} << 20;

class ScratchBlock {
 public:
  ScratchBlock() = default;
  explicit ScratchBlock(size_t bytes)
      : data_(static_cast<std::byte*>(::operator new(std::max<size_t>(bytes, 64), std::align_val_t{64}))),
        bytes_(bytes) {}
  ScratchBlock(ScratchBlock&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  ScratchBlock& operator=(ScratchBlock&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(bytes_, other.bytes_);
    return *this;
  }
  ScratchBlock(const ScratchBlock&) = delete;
  ScratchBlock& operator=(const ScratchBlock&) = delete;
  ~ScratchBlock() {
    if (data_) ::operator delete(data_, std::align_val_t{64});
  }
  std::byte* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  std::byte* data_ = nullptr;
  size_t bytes_ = 0;
};

inline ScratchBlock& cached_scratch(ScratchSlot slot) {
  thread_local ScratchBlock cache[static_cast<int>(ScratchSlot::kCount)];
  return cache[static_cast<int>(slot)];
}

// count elements of T (contents unspecified), 64-byte aligned.
template <typename T>
class ScratchArray {
 public:
  ScratchArray(ScratchSlot slot, int64_t count) : slot_(slot) {
    const size_t bytes = sizeof(T) * static_cast<size_t>(std::max<int64_t>(count, 1));
    ScratchBlock& cached = cached_scratch(slot);
    block_ = cached.bytes() >= bytes ? std::move(cached) : ScratchBlock(bytes);
  }
  ~ScratchArray() {
    if (block_.bytes() <= kRetainBytes) cached_scratch(slot_) = std::move(block_);
  }
  ScratchArray(const ScratchArray&) = delete;
  ScratchArray& operator=(const ScratchArray&) = delete;
  T* get() const { return reinterpret_cast<T*>(block_.data()); }

 private:
  ScratchSlot slot_;
  ScratchBlock block_;
};

}  // namespace dsv3::cpu
