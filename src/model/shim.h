// What the C++ shims (int8.cpp, attention.cpp, row_topk.cpp) share: errors cross to Rust as
// malloc'd NUL-terminated copies that clipcap_int8_free_error frees.
#pragma once
#include <cstdlib>
#include <cstring>

namespace clipcap_shim {

inline char* copy_message(const char* what) {
  size_t n = std::strlen(what) + 1;
  char* out = static_cast<char*>(std::malloc(n));
  if (out) std::memcpy(out, what, n);
  return out;
}

}  // namespace clipcap_shim
