// .npy files (format version 1.0 / 2.0 / 3.0): little-endian numeric arrays in C order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "buffer.h"

namespace edgemoe {

struct NpyArray {
  std::string descr;  // numpy dtype string as stored, e.g. "<f4", "<i8", "|u1"
  std::vector<int64_t> shape;
  AlignedBuffer data;  // raw little-endian elements
};

// Reads ``path``; throws InputError (exit 9) for a missing or unreadable file, big-endian or
// Fortran-order data, or object arrays.
NpyArray read_npy(const std::string& path);

// Writes a C-order array; ``descr`` as numpy writes it ("<f4", "<i8", ...).
void write_npy(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape,
               const void* data, size_t nbytes);

// Element size of a numpy dtype string ("<f4" -> 4); 0 if unsupported.
size_t npy_itemsize(const std::string& descr);

}  // namespace edgemoe
