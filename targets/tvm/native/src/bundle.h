// Reading a bundle: the manifest (edgemoe/bundle/format.py read_manifest) and size + sha256
// checks of the files it lists (verified_path / read_verified in Python), with the same error classes.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "buffer.h"
#include "json.h"

namespace edgemoe {

struct FileRecord {
  std::string rel;     // path inside the bundle, as listed
  std::string path;    // resolved absolute path
  int64_t bytes = 0;   // listed size
  std::string sha256;  // listed digest
};

// (size, mtime_ns, inode) of a file when it was checked: a reload with the same signature skips the hash.
struct FileSignature {
  int64_t size = -1;
  int64_t mtime_ns = 0;
  uint64_t ino = 0;
  bool operator==(const FileSignature& o) const {
    return size == o.size && mtime_ns == o.mtime_ns && ino == o.ino;
  }
};

class Bundle {
 public:
  // Reads and sanity-checks manifest.json (BundleError, exit 5, on anything wrong).
  explicit Bundle(const std::string& root);

  const Json& manifest() const { return manifest_; }
  const std::string& root() const { return root_; }

  // Resolves a manifest file entry: BundleError for a garbled entry or a path outside the bundle,
  // IntegrityError (exit 6) for a missing file.
  FileRecord resolve(const Json& record) const;

  // Copies a listed file to ``dest`` (a private file), checking size and sha256 on the bytes copied;
  // ``head`` gets its first bytes (the ELF header). On failure ``dest`` is removed.
  void copy_verified(const FileRecord& rec, const std::string& dest, std::string* head) const;
  // Streams a listed file through sha256 (no copy kept); returns its signature.
  FileSignature check_file(const FileRecord& rec) const;
  // Reads exactly rec.bytes into ``into``; checks the sha256 unless ``known`` still matches the file.
  // Returns the file's signature (to skip the hash on the next read).
  FileSignature read_into(const FileRecord& rec, char* into, const FileSignature* known) const;

 private:
  std::string root_;       // as given
  std::string root_real_;  // realpath
  Json manifest_;
};

[[noreturn]] void fail_size(const std::string& rel, int64_t actual, int64_t listed);
[[noreturn]] void fail_digest(const std::string& rel);

}  // namespace edgemoe
