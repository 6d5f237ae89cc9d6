#pragma once
// Argument checks for the C++ entry points. pybind11 turns std::invalid_argument into Python's ValueError, so a bad
// call that slipped past the Python wrapper still ends in an exception, never in a kernel reading out of bounds.
//
// Messages are assembled without iostreams: some host compilers, behind nvcc, instantiate the stream inserters inside
// the extension with private copies of the locale facet ids, and formatting a number there crashed the process.

#include <charconv>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace dsv3 {

namespace detail {

inline void append_part(std::string& message, std::string_view part) { message.append(part); }

template <typename T>
std::enable_if_t<std::is_arithmetic_v<T> || std::is_enum_v<T>> append_part(std::string& message, T value) {
  if constexpr (std::is_enum_v<T>) {
    append_part(message, static_cast<std::underlying_type_t<T>>(value));
  } else if constexpr (std::is_same_v<T, bool>) {
    message.append(value ? "true" : "false");
  } else if constexpr (std::is_same_v<T, char>) {
    message.push_back(value);
  } else {
    char digits[64];
    const auto end = std::to_chars(digits, digits + sizeof digits, value).ptr;
    message.append(digits, end);
  }
}

}  // namespace detail

template <typename... Parts>
[[noreturn]] void throw_invalid_argument(const Parts&... parts) {
  std::string message;
  (detail::append_part(message, parts), ...);
  throw std::invalid_argument(message);
}

}  // namespace dsv3

#define DSV3_CHECK(condition, ...)                 \
  do {                                             \
    if (!(condition)) {                            \
      ::dsv3::throw_invalid_argument(__VA_ARGS__); \
    }                                              \
  } while (0)
