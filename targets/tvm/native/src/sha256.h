// SHA-256 (FIPS 180-4): portable C++, with the x86 SHA extensions or the ARMv8 SHA-2 instructions
// where the CPU has them (checked at run time).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace edgemoe {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  std::string hex();  // finishes the digest

 private:
  void blocks(const uint8_t* p, size_t n);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

std::string sha256_hex(const void* data, size_t n);

// Which block function runs here: "x86-sha", "armv8-sha2" or "portable".
const char* sha256_impl();

}  // namespace edgemoe
