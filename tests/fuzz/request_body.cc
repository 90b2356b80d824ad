// libFuzzer target: the service's request bodies (src/service/request_body.h), as a client
// could send them (create, exec, build, pool size, snapshot, fork). The first byte picks the route; the rest is the
// body. Whatever the body, parsing refuses it or yields a request inside every documented limit.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "service/config.h"
#include "service/request_body.h"
#include "service/vm_service.h"
#include "templates/spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  deltavm::Result<nlohmann::json> body = deltavm::parse_request_body(text);
  if (!body) return 0;
  switch (data[0] % 6) {
    case 0: {
      deltavm::Result<deltavm::CreateVmRequest> create = deltavm::parse_create_vm(*body);
      if (create && (create->template_name.empty() || create->template_name.size() > 64)) __builtin_trap();
      break;
    }
    case 1: {
      deltavm::Result<deltavm::ExecBody> exec = deltavm::parse_exec(*body);
      if (!exec) break;
      const deltavm::ExecRequest& request = exec->request;
      if (request.command.empty() || request.command.size() > deltavm::kMaxCommandBytes) __builtin_trap();
      if (request.stdin_bytes && request.stdin_bytes->size() > deltavm::kMaxStdinBytes) __builtin_trap();
      if (request.max_output_bytes > deltavm::kMaxOutputBytes) __builtin_trap();
      if (request.timeout.count() < 1000 || request.timeout.count() > int64_t{deltavm::kMaxExecTimeoutSeconds} * 1000) {
        __builtin_trap();
      }
      break;
    }
    case 2: (void)deltavm::parse_build(*body); break;
    case 3: {
      deltavm::Result<uint64_t> pool_size = deltavm::parse_pool_size(*body);
      if (pool_size && *pool_size > deltavm::kMaxPoolSize) __builtin_trap();
      break;
    }
    case 4: {
      deltavm::Result<deltavm::SnapshotBody> snapshot = deltavm::parse_snapshot(*body);
      if (snapshot && !deltavm::valid_template_name(snapshot->name)) __builtin_trap();
      break;
    }
    case 5: {
      deltavm::Result<uint64_t> count = deltavm::parse_fork(*body);
      if (count && (*count == 0 || *count > deltavm::kMaxForks)) __builtin_trap();
      break;
    }
  }
  return 0;
}
