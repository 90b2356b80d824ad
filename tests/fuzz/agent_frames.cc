// libFuzzer target: the host's reader of agent frames (src/backends/agent_client.h), fed what
// a hostile guest could write to its agent port. The input is cut into reads of the sizes its
// first bytes give, as a serial port delivers them. Whatever arrives, the reader holds at most
// the bytes it was given, every frame it returns passed its checks and fits its limit, and no
// command keeps more output than its bound.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string_view>

#include "backends/agent_client.h"

extern "C" {
#include "agent_protocol.h"
}

namespace {

constexpr size_t kOutputBound = 4096;  // Small, so that the fuzzer reaches the cut.
constexpr size_t kMaxCommands = 8;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  // Reads of 1 to 256 bytes (the first byte), or the whole input at once (0).
  size_t read_bytes = data[0] == 0 ? size : data[0];
  std::string_view input(reinterpret_cast<const char*>(data + 1), size - 1);
  deltavm::AgentFrameReader reader("fuzz agent");
  std::map<uint64_t, deltavm::AgentCommand> commands;
  size_t given = 0;
  while (!input.empty()) {
    std::string_view chunk = input.substr(0, read_bytes);
    input.remove_prefix(chunk.size());
    reader.append(chunk);
    given += chunk.size();
    for (;;) {
      deltavm::Result<std::optional<deltavm::AgentFrame>> frame = reader.next();
      if (!frame) return 0;  // The connection would be closed with this error.
      if (!*frame) break;
      if ((*frame)->payload.size() > AGENT_MAX_CHUNK_BYTES) __builtin_trap();
      auto it = commands.find((*frame)->id);
      if (it == commands.end() && commands.size() < kMaxCommands) {
        it = commands.emplace((*frame)->id, deltavm::AgentCommand{}).first;
        it->second.max_output_bytes = kOutputBound;
      }
      if (it == commands.end() || it->second.done) continue;
      if (!deltavm::record_agent_frame(**frame, it->second, "fuzz agent")) return 0;
      const deltavm::ExecResult& result = it->second.result;
      if (result.stdout_bytes.size() > kOutputBound || result.stderr_bytes.size() > kOutputBound) __builtin_trap();
      if (it->second.done && !it->second.failure && (result.exit_status < 0 || result.exit_status > 255)) {
        __builtin_trap();
      }
    }
    if (reader.buffer().size() > given) __builtin_trap();
  }
  return 0;
}
