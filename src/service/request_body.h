// The bodies of the service's requests (docs/api.yaml): each is parsed from hostile JSON into
// the typed request the service acts on, or refused with a 400 error naming the field. Nothing
// here touches the service, so every parser is fuzzed on its own (tests/fuzz/request_body.cc).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "backends/agent_client.h"
#include "base/error.h"
#include "service/vm_service.h"
#include "templates/spec.h"

namespace deltavm {

// Exec output kept per stream when a request names no limit.
inline constexpr size_t kDefaultExecOutputBytes = 1 << 20;
inline constexpr uint64_t kMaxExecTimeoutSeconds = 3600;

// A request body: a JSON object, else an error.
Result<nlohmann::json> parse_request_body(std::string_view text);

// POST /v1/vms
Result<CreateVmRequest> parse_create_vm(const nlohmann::json& body);

// POST /v1/vms/{id}/exec: the argv quoted for the guest's /bin/sh, stdin decoded.
struct ExecBody {
  ExecRequest request;
  std::string encoding;  // "utf-8" or "base64": of stdin here, and of the reply's streams.
};
Result<ExecBody> parse_exec(const nlohmann::json& body);

// POST /v1/templates: {"spec": {...}, "backend": "qemu"}. Files named by the spec are read on
// the service's host, so their paths must be absolute.
struct BuildBody {
  TemplateSpec spec;
  std::string backend = "qemu";
};
Result<BuildBody> parse_build(const nlohmann::json& body);

// PUT /v1/templates/{name}/pool: {"size": N}.
// POST /v1/vms/{id}/snapshots: {"name": NAME, "stop": false}.
struct SnapshotBody {
  std::string name;
  bool stop = false;
};
Result<SnapshotBody> parse_snapshot(const nlohmann::json& body);

// POST /v1/vms/{id}/fork: {"count": N}, N from 1 to kMaxForks (default 1).
Result<uint64_t> parse_fork(const nlohmann::json& body);

Result<uint64_t> parse_pool_size(const nlohmann::json& body);

// Each argument single-quoted for /bin/sh, so that the guest runs exactly this argv.
std::string shell_quote(const std::vector<std::string>& arguments);

}  // namespace deltavm
