// Error classes with the Python CLI's exit codes (edgemoe/errors.py; README "Exit codes").
#pragma once

#include <stdexcept>
#include <string>

namespace edgemoe {

enum ExitCode : int {
  kInternal = 1,
  kUsage = 2,
  kConfig = 4,
  kBundle = 5,
  kIntegrity = 6,
  kTask = 8,
  kInput = 9,
  kInterrupted = 130,
};

class Error : public std::runtime_error {
 public:
  Error(int code, const std::string& message) : std::runtime_error(message), code_(code) {}
  int code() const { return code_; }

 private:
  int code_;
};

inline Error ConfigError(const std::string& m) { return Error(kConfig, m); }
inline Error BundleError(const std::string& m) { return Error(kBundle, m); }
inline Error IntegrityError(const std::string& m) { return Error(kIntegrity, m); }
inline Error TaskError(const std::string& m) { return Error(kTask, m); }
inline Error InputError(const std::string& m) { return Error(kInput, m); }
inline Error UsageError(const std::string& m) { return Error(kUsage, m); }

}  // namespace edgemoe
