// How commands find the service that serves a runtime: RUNTIME/service.json names its
// process, its socket and its store, and RUNTIME/service.lock (flock) is held by it for its
// whole life, so two services never share a runtime. A record whose process is gone is stale
// and ignored.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

#include "base/error.h"
#include "base/file.h"
#include "base/subprocess.h"

namespace deltavm {

struct ServiceRecord {
  ProcessIdentity process;
  std::filesystem::path socket;
  std::filesystem::path store;  // Canonical.
  std::string tcp;              // "127.0.0.1:PORT" if it also listens there; else empty.
};

// Takes RUNTIME/service.lock; kBusy, naming the holder, if another service has it.
Result<Fd> lock_service_runtime(const std::filesystem::path& runtime);
Status write_service_record(const std::filesystem::path& runtime, const ServiceRecord& record);
void remove_service_record(const std::filesystem::path& runtime);
// The service serving `runtime`, if one runs.
Result<std::optional<ServiceRecord>> find_service(const std::filesystem::path& runtime);

}  // namespace deltavm
