// One bundle graph (a TVM shared library holding a Relax VM executable) in a Relax VirtualMachine,
// through TVM's C++ runtime only (libtvm_runtime + libtvm_ffi); host (CPU) tensors in and out.
#pragma once

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "buffer.h"

namespace edgemoe {

namespace ffi = tvm::ffi;

// Tensor helpers (C-order, 64-byte aligned host memory).
ffi::Tensor host_empty(const std::vector<int64_t>& shape, DLDataType dtype);
// A tensor over memory someone else owns (expert weights in the cache, pinned while in use).
ffi::Tensor host_borrow(void* data, const std::vector<int64_t>& shape, DLDataType dtype);
std::vector<int64_t> shape_of(const ffi::Tensor& t);
int64_t numel(const ffi::Tensor& t);
size_t nbytes(const ffi::Tensor& t);
template <typename T>
T* data_of(const ffi::Tensor& t) {
  const DLTensor* d = t.GetDLTensorPtr();
  return reinterpret_cast<T*>(static_cast<char*>(d->data) + d->byte_offset);
}
// dtype <-> numpy names ("float32", "int64", ...); throws std::runtime_error if unknown.
DLDataType dtype_from_name(const std::string& name);
std::string dtype_name(DLDataType t);
std::string npy_descr(DLDataType t);
bool is_dtype(const ffi::Tensor& t, DLDataType want);

// The CPU architecture an ELF file is built for ("x86_64", "aarch64", "ELF machine N"), or "" if not ELF.
std::string elf_machine(const char* data, size_t n);
std::string host_machine();

class TvmGraph {
 public:
  // Loads a library from ``path``: the private copy its bytes were checked on (never the bundle's
  // file, which could change after the check), removed once loaded. ``head``: its first bytes.
  TvmGraph(const std::string& name, const std::string& path, const std::string& head, std::vector<std::string> inputs,
           std::vector<std::string> outputs);

  std::vector<ffi::Tensor> run(const std::vector<ffi::Tensor>& args) const;

  const std::string& name() const { return name_; }
  const std::vector<std::string>& input_names() const { return inputs_; }
  // Time spent in run() and calls so far (for --profile).
  double total_ms() const { return total_ms_; }
  int64_t calls() const { return calls_; }

 private:
  std::string name_;
  std::vector<std::string> inputs_, outputs_;
  std::optional<ffi::Module> lib_, vm_;
  std::optional<ffi::Function> main_;
  mutable double total_ms_ = 0;
  mutable int64_t calls_ = 0;
};

// Sets TVM's CPU worker-thread count (runtime.config_threadpool), 0: TVM's default.
void configure_threads(int threads);

}  // namespace edgemoe
