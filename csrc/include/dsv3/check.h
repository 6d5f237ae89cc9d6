#pragma once
// Argument checks for the C++ entry points. pybind11 turns std::invalid_argument into Python's ValueError, so a bad
// call that slipped past the Python wrapper still ends in an exception, never in a kernel reading out of bounds.

#include <sstream>
#include <stdexcept>
#include <string>

namespace dsv3 {

template <typename... Parts>
[[noreturn]] void throw_invalid_argument(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw std::invalid_argument(message.str());
}

}  // namespace dsv3

#define DSV3_CHECK(condition, ...)                 \
  do {                                             \
    if (!(condition)) {                            \
      ::dsv3::throw_invalid_argument(__VA_ARGS__); \
    }                                              \
  } while (0)
