#include "npy.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "errors.h"

namespace edgemoe {

size_t npy_itemsize(const std::string& descr) {
  if (descr.size() < 3) return 0;
  char order = descr[0], kind = descr[1];
  if (order != '<' && order != '|' && order != '=') return 0;
  if (kind != 'f' && kind != 'i' && kind != 'u' && kind != 'b') return 0;
  int n = std::atoi(descr.c_str() + 2);
  if (n != 1 && n != 2 && n != 4 && n != 8) return 0;
  if (kind == 'f' && n == 1) return 0;
  return static_cast<size_t>(n);
}

namespace {

// Value of ``key`` in the header's Python dict literal, as raw text.
std::string header_field(const std::string& header, const std::string& key, const std::string& path) {
  std::string needle = "'" + key + "'";
  size_t pos = header.find(needle);
  if (pos == std::string::npos) throw InputError("cannot read " + path + " as .npy: header has no " + key);
  pos = header.find(':', pos + needle.size());
  if (pos == std::string::npos) throw InputError("cannot read " + path + " as .npy: garbled header");
  ++pos;
  while (pos < header.size() && header[pos] == ' ') ++pos;
  size_t end = pos;
  if (header[pos] == '(') {
    end = header.find(')', pos);
    if (end == std::string::npos) throw InputError("cannot read " + path + " as .npy: garbled header");
    return header.substr(pos, end - pos + 1);
  }
  if (header[pos] == '\'' || header[pos] == '"') {
    end = header.find(header[pos], pos + 1);
    if (end == std::string::npos) throw InputError("cannot read " + path + " as .npy: garbled header");
    return header.substr(pos + 1, end - pos - 1);
  }
  while (end < header.size() && header[end] != ',' && header[end] != '}') ++end;
  return header.substr(pos, end - pos);
}

}  // namespace

NpyArray read_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError("input file not found: " + path);
  auto bad = [&](const std::string& why) { return InputError("cannot read " + path + " as .npy: " + why); };
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw bad("not a .npy file");
  int major = static_cast<unsigned char>(magic[6]);
  uint32_t header_len = 0;
  if (major == 1) {
    unsigned char b[2];
    if (!f.read(reinterpret_cast<char*>(b), 2)) throw bad("truncated header");
    header_len = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    if (!f.read(reinterpret_cast<char*>(b), 4)) throw bad("truncated header");
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t(b[3]) << 24);
  } else {
    throw bad("unsupported format version " + std::to_string(major));
  }
  if (header_len > (1u << 20)) throw bad("header too large");
  std::string header(header_len, '\0');
  if (!f.read(&header[0], header_len)) throw bad("truncated header");
  NpyArray out;
  out.descr = header_field(header, "descr", path);
  if (npy_itemsize(out.descr) == 0) throw bad("unsupported dtype '" + out.descr + "' (little-endian numbers only)");
  std::string fortran = header_field(header, "fortran_order", path);
  if (fortran.find("True") != std::string::npos) throw bad("Fortran-order arrays are not supported (save it C-order)");
  std::string shape = header_field(header, "shape", path);
  int64_t count = 1;
  {
    std::string inner = shape.substr(1, shape.size() - 2);
    std::stringstream ss(inner);
    std::string item;
    while (std::getline(ss, item, ',')) {
      size_t a = item.find_first_not_of(" L"), b = item.find_last_not_of(" L");
      if (a == std::string::npos) continue;
      item = item.substr(a, b - a + 1);
      char* end = nullptr;
      long long v = std::strtoll(item.c_str(), &end, 10);
      if (*end != '\0' || v < 0) throw bad("garbled shape " + shape);
      out.shape.push_back(v);
      count *= v;
    }
  }
  size_t nbytes = static_cast<size_t>(count) * npy_itemsize(out.descr);
  out.data = AlignedBuffer(nbytes);
  if (nbytes && !f.read(out.data.data(), static_cast<std::streamsize>(nbytes)))
    throw bad("file is truncated (fewer elements than its shape)");
  return out;
}

void write_npy(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape,
               const void* data, size_t nbytes) {
  std::string dims;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) dims += ", ";
    dims += std::to_string(shape[i]);
  }
  if (shape.size() == 1) dims += ",";
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  // Magic (6) + version (2) + length (2) + header + '\n' padded to a multiple of 64 (as numpy).
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw InputError("cannot write " + path);
  f.write("\x93NUMPY\x01\x00", 8);
  unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff), static_cast<unsigned char>(header.size() >> 8)};
  f.write(reinterpret_cast<char*>(len), 2);
  f << header;
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
  if (!f) throw InputError("cannot write " + path);
}

}  // namespace edgemoe
