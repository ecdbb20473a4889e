#include "bundle.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "errors.h"
#include "sha256.h"

namespace edgemoe {

namespace {
constexpr int kSchemaVersion = 1;
const char* kRequired[] = {"format", "schema_version", "edgemoe_version", "model", "target",
                           "device", "input",          "tasks",           "segments", "moe_layers"};

std::string join(const std::string& a, const std::string& b) {
  if (a.empty() || a.back() == '/') return a + b;
  return a + "/" + b;
}

FileSignature signature_of(const struct stat& st) {
  FileSignature s;
  s.size = st.st_size;
  s.mtime_ns = int64_t(st.st_mtim.tv_sec) * 1000000000LL + st.st_mtim.tv_nsec;
  s.ino = st.st_ino;
  return s;
}

// Reads exactly n bytes (or up to EOF) from fd into p; returns bytes read.
size_t read_full(int fd, char* p, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::read(fd, p + got, n - got);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw IntegrityError(std::string("cannot read bundle file: ") + std::strerror(errno));
    }
    if (r == 0) break;
    got += static_cast<size_t>(r);
  }
  return got;
}
}  // namespace

void fail_size(const std::string& rel, int64_t actual, int64_t listed) {
  throw IntegrityError("bundle file " + rel + " has " + std::to_string(actual) + " bytes, manifest says " +
                       std::to_string(listed) + " (truncated or replaced)");
}

void fail_digest(const std::string& rel) {
  throw IntegrityError("bundle file " + rel + " fails its sha256 check (corrupted or replaced)");
}

Bundle::Bundle(const std::string& root) : root_(root) {
  struct stat st;
  if (::stat(root.c_str(), &st) != 0) throw BundleError("bundle not found: " + root);
  if (!S_ISDIR(st.st_mode)) throw BundleError("not a bundle (not a folder): " + root);
  std::string path = join(root, "manifest.json");
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
    throw BundleError("not a bundle (no manifest.json): " + root);
  char real[PATH_MAX];
  if (!::realpath(root.c_str(), real)) throw BundleError("bundle not found: " + root);
  root_real_ = real;
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    manifest_ = Json::parse(ss.str());
  } catch (const std::exception& e) {
    throw BundleError("garbled manifest " + path + ": " + e.what());
  }
  const Json* format = manifest_.find("format");
  if (!manifest_.is_object() || !format || !format->is_string() || format->as_string() != "edgemoe-bundle")
    throw BundleError("not an edgemoe manifest: " + path);
  const Json* version = manifest_.find("schema_version");
  if (!version || !version->is_number() || version->as_double() != kSchemaVersion) {
    std::string shown = version ? version->dump() : "None";
    throw BundleError("bundle schema version " + shown + " is not supported (this edgemoe reads version " +
                      std::to_string(kSchemaVersion) + "); recompile the bundle");
  }
  std::string missing;
  for (const char* k : kRequired)
    if (!manifest_.contains(k)) missing += (missing.empty() ? "" : ", ") + std::string(k);
  if (!missing.empty()) throw BundleError("garbled manifest " + path + ": missing " + missing);
  try {
    if (manifest_.at("segments").size() != manifest_.at("moe_layers").size() + 1)
      throw BundleError("garbled manifest " + path + ": segments and MoE layers do not interleave");
  } catch (const std::runtime_error& e) {
    if (dynamic_cast<const Error*>(&e)) throw;
    throw BundleError("garbled manifest " + path + ": " + e.what());
  }
}

FileRecord Bundle::resolve(const Json& record) const {
  FileRecord rec;
  try {
    rec.rel = record.at("file").as_string();
    rec.bytes = record.at("bytes").as_int();
    rec.sha256 = record.at("sha256").as_string();
  } catch (const std::exception&) {
    throw BundleError("garbled manifest entry " + record.dump());
  }
  // Lexically: no absolute path, no climbing above the bundle.
  bool escapes = rec.rel.empty() || rec.rel[0] == '/';
  int depth = 0;
  std::stringstream parts(rec.rel);
  std::string part;
  while (std::getline(parts, part, '/')) {
    if (part == "..") --depth;
    else if (!part.empty() && part != ".") ++depth;
    if (depth < 0) escapes = true;
  }
  if (escapes) throw BundleError("manifest entry points outside the bundle: " + rec.rel);
  std::string joined = join(root_real_, rec.rel);
  char real[PATH_MAX];
  if (!::realpath(joined.c_str(), real)) throw IntegrityError("missing bundle file " + rec.rel);
  rec.path = real;
  // Symbolic links may not lead out of the bundle either.
  if (rec.path.compare(0, root_real_.size() + 1, root_real_ + "/") != 0)
    throw BundleError("manifest entry points outside the bundle: " + rec.rel);
  struct stat st;
  if (::stat(rec.path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) throw IntegrityError("missing bundle file " + rec.rel);
  return rec;
}

void Bundle::copy_verified(const FileRecord& rec, const std::string& dest, std::string* head) const {
  int fd = ::open(rec.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IntegrityError("missing bundle file " + rec.rel);
  int out = ::open(dest.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (out < 0) {
    ::close(fd);
    throw BundleError("cannot write a private copy of " + rec.rel + ": " + std::strerror(errno));
  }
  Sha256 h;
  static thread_local AlignedBuffer chunk(1 << 20);
  int64_t total = 0;
  head->clear();
  try {
    struct stat st;
    ::fstat(fd, &st);
    if (st.st_size != rec.bytes) fail_size(rec.rel, st.st_size, rec.bytes);
    while (true) {
      size_t got = read_full(fd, chunk.data(), chunk.size());
      h.update(chunk.data(), got);
      if (head->size() < 64) head->append(chunk.data(), std::min<size_t>(got, 64 - head->size()));
      for (size_t done = 0; done < got;) {
        ssize_t w = ::write(out, chunk.data() + done, got - done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) throw BundleError("cannot write a private copy of " + rec.rel + ": " + std::strerror(errno));
        done += static_cast<size_t>(w);
      }
      total += static_cast<int64_t>(got);
      if (got < chunk.size()) break;
    }
    if (total != rec.bytes) fail_size(rec.rel, total, rec.bytes);
    if (h.hex() != rec.sha256) fail_digest(rec.rel);
  } catch (...) {
    ::close(fd);
    ::close(out);
    ::unlink(dest.c_str());
    throw;
  }
  ::close(fd);
  if (::close(out) != 0) {
    ::unlink(dest.c_str());
    throw BundleError("cannot write a private copy of " + rec.rel);
  }
}

FileSignature Bundle::check_file(const FileRecord& rec) const {
  int fd = ::open(rec.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IntegrityError("missing bundle file " + rec.rel);
  struct stat st;
  ::fstat(fd, &st);
  if (st.st_size != rec.bytes) {
    ::close(fd);
    fail_size(rec.rel, st.st_size, rec.bytes);
  }
  Sha256 h;
  static thread_local AlignedBuffer chunk(1 << 20);
  int64_t total = 0;
  try {
    while (true) {
      size_t got = read_full(fd, chunk.data(), chunk.size());
      h.update(chunk.data(), got);
      total += static_cast<int64_t>(got);
      if (got < chunk.size()) break;
    }
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
  if (total != rec.bytes) fail_size(rec.rel, total, rec.bytes);
  if (h.hex() != rec.sha256) fail_digest(rec.rel);
  return signature_of(st);
}

FileSignature Bundle::read_into(const FileRecord& rec, char* into, const FileSignature* known) const {
  int fd = ::open(rec.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IntegrityError("missing bundle file " + rec.rel);
  struct stat st;
  ::fstat(fd, &st);
  FileSignature sig = signature_of(st);
  size_t got;
  try {
    if (st.st_size != rec.bytes) fail_size(rec.rel, st.st_size, rec.bytes);
    got = read_full(fd, into, static_cast<size_t>(rec.bytes));
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
  if (static_cast<int64_t>(got) != rec.bytes) fail_size(rec.rel, static_cast<int64_t>(got), rec.bytes);
  // One read straight into the buffer the kernel will use; the hash runs on those very bytes
  // unless the file is the one already checked (same size, mtime and inode).
  if (!(known && *known == sig) && sha256_hex(into, got) != rec.sha256) fail_digest(rec.rel);
  return sig;
}

}  // namespace edgemoe
