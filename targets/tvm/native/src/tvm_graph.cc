#include "tvm_graph.h"

#include <sys/utsname.h>
#include <unistd.h>

#include <cstdlib>
#include <sstream>

#include "errors.h"

namespace edgemoe {

namespace {

struct HostAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64 + 64);
    if (!t->data) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

struct Borrowed {
  void AllocData(DLTensor* t, void* p) { t->data = p; }
  void FreeData(DLTensor*) {}
};

constexpr DLDevice kCpu{kDLCPU, 0};

std::string last_line(const std::string& text) {
  std::stringstream ss(text);
  std::string line, last;
  while (std::getline(ss, line)) {
    size_t a = line.find_first_not_of(" \t\r");
    if (a != std::string::npos) last = line.substr(a);
  }
  return last;
}

std::string ffi_message(const std::exception& e) {
  if (auto* err = dynamic_cast<const ffi::Error*>(&e)) return err->kind() + ": " + last_line(err->message());
  return last_line(e.what());
}

// Kinds of a module and everything it imports ("library", "llvm", "cuda", ...).
void module_kinds(const ffi::Module& mod, std::vector<std::string>* out) {
  out->push_back(mod->kind());
  for (const ffi::Any& imp : mod->imports()) module_kinds(imp.cast<ffi::Module>(), out);
}

}  // namespace

ffi::Tensor host_empty(const std::vector<int64_t>& shape, DLDataType dtype) {
  return ffi::Tensor::FromNDAlloc(HostAlloc(), ffi::ShapeView(shape.data(), shape.size()), dtype, kCpu);
}

ffi::Tensor host_borrow(void* data, const std::vector<int64_t>& shape, DLDataType dtype) {
  return ffi::Tensor::FromNDAlloc(Borrowed(), ffi::ShapeView(shape.data(), shape.size()), dtype, kCpu, data);
}

std::vector<int64_t> shape_of(const ffi::Tensor& t) {
  const DLTensor* d = t.GetDLTensorPtr();
  return std::vector<int64_t>(d->shape, d->shape + d->ndim);
}

int64_t numel(const ffi::Tensor& t) {
  int64_t n = 1;
  for (int64_t s : shape_of(t)) n *= s;
  return n;
}

size_t nbytes(const ffi::Tensor& t) { return ffi::GetDataSize(*t.GetDLTensorPtr()); }

bool is_dtype(const ffi::Tensor& t, DLDataType want) {
  DLDataType d = t.dtype();
  return d.code == want.code && d.bits == want.bits && d.lanes == want.lanes;
}

DLDataType dtype_from_name(const std::string& n) {
  if (n == "float32") return {kDLFloat, 32, 1};
  if (n == "float64") return {kDLFloat, 64, 1};
  if (n == "float16") return {kDLFloat, 16, 1};
  if (n == "bfloat16") return {kDLBfloat, 16, 1};
  if (n == "int8") return {kDLInt, 8, 1};
  if (n == "int16") return {kDLInt, 16, 1};
  if (n == "int32") return {kDLInt, 32, 1};
  if (n == "int64") return {kDLInt, 64, 1};
  if (n == "uint8") return {kDLUInt, 8, 1};
  if (n == "uint16") return {kDLUInt, 16, 1};
  if (n == "uint32") return {kDLUInt, 32, 1};
  if (n == "uint64") return {kDLUInt, 64, 1};
  if (n == "bool") return {kDLBool, 8, 1};
  throw std::runtime_error("unsupported dtype '" + n + "'");
}

std::string dtype_name(DLDataType t) {
  std::string bits = std::to_string(t.bits);
  switch (t.code) {
    case kDLFloat: return "float" + bits;
    case kDLBfloat: return "bfloat" + bits;
    case kDLInt: return "int" + bits;
    case kDLUInt: return "uint" + bits;
    case kDLBool: return "bool";
    default: return "dtype(code " + std::to_string(t.code) + ")";
  }
}

std::string npy_descr(DLDataType t) {
  std::string bytes = std::to_string(t.bits / 8);
  std::string order = t.bits == 8 ? "|" : "<";
  switch (t.code) {
    case kDLFloat: return order + "f" + bytes;
    case kDLInt: return order + "i" + bytes;
    case kDLUInt: return order + "u" + bytes;
    case kDLBool: return "|b1";
    default: throw std::runtime_error("cannot save dtype " + dtype_name(t) + " as .npy");
  }
}

std::string elf_machine(const char* data, size_t n) {
  if (n < 20 || data[0] != 0x7f || data[1] != 'E' || data[2] != 'L' || data[3] != 'F') return "";
  int m = static_cast<unsigned char>(data[18]) | (static_cast<unsigned char>(data[19]) << 8);
  if (m == 62) return "x86_64";
  if (m == 183) return "aarch64";
  return "ELF machine " + std::to_string(m);
}

std::string host_machine() {
#if defined(__x86_64__)
  return "x86_64";
#elif defined(__aarch64__)
  return "aarch64";
#else
  struct utsname u;
  uname(&u);
  return u.machine;
#endif
}

TvmGraph::TvmGraph(const std::string& name, const std::string& path, const std::string& head,
                   std::vector<std::string> inputs, std::vector<std::string> outputs)
    : name_(name), inputs_(std::move(inputs)), outputs_(std::move(outputs)) {
  std::string built = elf_machine(head.data(), head.size());
  if (!built.empty() && built != host_machine())
    throw BundleError(name + " is " + built + " code and this machine is " + host_machine() +
                      ": run the bundle on the device it was built for");
  try {
    lib_ = ffi::Module::LoadFromFile(path);
  } catch (const std::exception& e) {
    ::unlink(path.c_str());
    throw BundleError("tvm cannot load " + name + ": " + ffi_message(e));
  }
  ::unlink(path.c_str());  // mapped now; nothing left on disk
  std::vector<std::string> kinds;
  module_kinds(*lib_, &kinds);
  for (const auto& k : kinds)
    if (k == "cuda" || k == "opencl" || k == "vulkan" || k == "metal" || k == "rocm")
      throw BundleError(name + " holds " + k + " code; edgemoe-rt runs CPU bundles only");
  try {
    auto load = (*lib_)->GetFunction("vm_load_executable", true);
    if (!load.has_value()) throw BundleError(name + " holds no Relax VM executable");
    vm_ = (*load)().cast<ffi::Module>();
    // Device (type, id, allocator) triples; the CPU runs the shape functions. 2: pooled allocator.
    (*vm_)->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    auto main = (*vm_)->GetFunction("main");
    if (!main.has_value()) throw BundleError(name + " has no main function");
    main_ = *main;
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw BundleError("tvm cannot load " + name + ": " + ffi_message(e));
  }
}

std::vector<ffi::Tensor> TvmGraph::run(const std::vector<ffi::Tensor>& args) const {
  std::vector<ffi::AnyView> packed(args.begin(), args.end());
  ffi::Any result;
  auto start = std::chrono::steady_clock::now();
  try {
    main_->CallPacked(packed.data(), static_cast<int32_t>(packed.size()), &result);
  } catch (const std::exception& e) {
    throw BundleError("tvm graph " + name_ + " rejects its inputs: " + ffi_message(e));
  }
  total_ms_ += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  ++calls_;
  std::vector<ffi::Tensor> outs;
  if (auto t = result.as<ffi::Tensor>()) {
    outs.push_back(*t);
  } else if (auto arr = result.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& a : *arr) {
      auto t2 = a.as<ffi::Tensor>();
      if (!t2) throw BundleError("tvm graph " + name_ + " returned a " + a.GetTypeKey() + ", not a tensor");
      outs.push_back(*t2);
    }
  } else {
    throw BundleError("tvm graph " + name_ + " returned a " + result.GetTypeKey());
  }
  for (const auto& t : outs) {
    const DLTensor* d = t.GetDLTensorPtr();
    if (d->device.device_type != kDLCPU) throw BundleError("tvm graph " + name_ + " returned a non-CPU tensor");
    if (d->strides) {  // must be C-contiguous
      int64_t expect = 1;
      for (int i = d->ndim - 1; i >= 0; --i) {
        if (d->shape[i] != 1 && d->strides[i] != expect)
          throw BundleError("tvm graph " + name_ + " returned a strided tensor");
        expect *= d->shape[i];
      }
    }
  }
  return outs;
}

void configure_threads(int threads) {
  if (threads <= 0) return;
  auto f = ffi::Function::GetGlobal("runtime.config_threadpool");
  if (f.has_value()) (*f)(1, threads);
}

}  // namespace edgemoe
