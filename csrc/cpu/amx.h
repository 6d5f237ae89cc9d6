#pragma once
// AMX tile support shared by the CPU kernels that run tile dot products (tdpbf16ps): the FP8 GEMM and MLA decode.
// DSV3_CPU_AMX is defined where the build targets AMX-BF16 on Linux; nothing below exists otherwise.

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define DSV3_CPU_AMX 1

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace dsv3::cpu::amx {

constexpr int kTileRows = 16;  // every tile: 16 rows of 64 bytes (16 fp32, or 32 bf16 / 16 bf16 pairs)

// Whether the kernels use AMX: Linux grants the tile state to processes that ask (ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA), and DSV3_CPU_NO_AMX=1 keeps them on AVX-512 (to compare the two, or where AMX state is
// unwelcome). The variable is read on every call, so it can be switched while a process runs (the tests run both).
inline bool enabled() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  const char* value = std::getenv("DSV3_CPU_NO_AMX");
  const bool disabled = value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
  return granted && !disabled;
}

// Configures the calling thread's eight tiles as 16 rows x 64 bytes (palette 1) for the object's lifetime and
// releases them after, so a thread that is done with AMX does not carry the tile state through context switches.
class TileScope {
 public:
  TileScope() {
    Config config;
    _tile_loadconfig(&config);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  struct alignas(64) Config {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
    Config() {
      for (int t = 0; t < 8; ++t) {
        bytes_per_row[t] = 64;
        rows[t] = kTileRows;
      }
    }
  };
};

}  // namespace dsv3::cpu::amx

#endif
