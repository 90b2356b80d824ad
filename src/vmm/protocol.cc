#include "vmm/protocol.h"

#include <nlohmann/json.hpp>

#include "base/json_fields.h"

namespace deltavm::vmm {
namespace {

using nlohmann::json;

// Guest memory above 3 GiB would need a second slot past the PCI hole; the VMM refuses it.
constexpr uint64_t kMaxMemoryBytes = 3ull << 30;
constexpr uint32_t kMaxVcpus = 64;

template <typename T>
constexpr std::string_view op_name() {
  if constexpr (std::is_same_v<T, BootMicroRequest>) return "boot_micro";
  if constexpr (std::is_same_v<T, BootLinuxRequest>) return "boot_linux";
  if constexpr (std::is_same_v<T, RestoreRequest>) return "restore";
  if constexpr (std::is_same_v<T, StatusRequest>) return "status";
  if constexpr (std::is_same_v<T, PauseRequest>) return "pause";
  if constexpr (std::is_same_v<T, ResumeRequest>) return "resume";
  if constexpr (std::is_same_v<T, WaitRequest>) return "wait";
  if constexpr (std::is_same_v<T, SaveRequest>) return "save";
  if constexpr (std::is_same_v<T, SerialOutputRequest>) return "serial_output";
  if constexpr (std::is_same_v<T, FloorRequest>) return "floor";
  if constexpr (std::is_same_v<T, QuitRequest>) return "quit";
}

template <typename T>
constexpr std::string_view reply_name() {
  if constexpr (std::is_same_v<T, StatusReply>) return "status";
  if constexpr (std::is_same_v<T, SaveReply>) return "save";
  if constexpr (std::is_same_v<T, SerialOutputReply>) return "serial_output";
  if constexpr (std::is_same_v<T, FloorReply>) return "floor";
  if constexpr (std::is_same_v<T, QuitReply>) return "quit";
}

void put(json& out, const char* field, const std::optional<std::string>& value) {
  if (value) out[field] = *value;
}
void put(json& out, const char* field, const std::optional<uint64_t>& value) {
  if (value) out[field] = *value;
}

void put_start(json& out, const StartOptions& start) {
  out["paused"] = start.paused;
  out["log_dirty"] = start.log_dirty;
  put(out, "pause_at_checkpoint", start.pause_at_checkpoint);
}

Status read_start(JsonFields& fields, StartOptions& start) {
  DELTAVM_TRY(fields.boolean("paused", start.paused));
  DELTAVM_TRY(fields.boolean("log_dirty", start.log_dirty));
  return fields.unsigned_integer("pause_at_checkpoint", start.pause_at_checkpoint);
}

Status read_memory_bytes(JsonFields& fields, uint64_t& memory_bytes) {
  return fields.unsigned_integer("memory_bytes", memory_bytes, /*required=*/true, kMaxMemoryBytes);
}

json to_json(const BootMicroRequest& r) {
  json out = {{"program", r.program},
              {"memory_bytes", r.memory_bytes},
              {"passes", r.passes},
              {"seed", r.seed},
              {"heartbeat_bytes", r.heartbeat_bytes}};
  put(out, "work_bytes", r.work_bytes);
  put(out, "ram_file", r.ram_file);
  put_start(out, r.start);
  return out;
}
Status from_json(JsonFields& fields, BootMicroRequest& r) {
  DELTAVM_TRY(fields.text("program", r.program, true));
  DELTAVM_TRY(read_memory_bytes(fields, r.memory_bytes));
  DELTAVM_TRY(fields.unsigned_integer("work_bytes", r.work_bytes, kMaxMemoryBytes));
  DELTAVM_TRY(fields.unsigned_integer("passes", r.passes, false, 1 << 20));
  DELTAVM_TRY(fields.unsigned_integer("seed", r.seed));
  DELTAVM_TRY(fields.unsigned_integer("heartbeat_bytes", r.heartbeat_bytes, false, kMaxMemoryBytes));
  DELTAVM_TRY(fields.text("ram_file", r.ram_file));
  return read_start(fields, r.start);
}

json to_json(const BootLinuxRequest& r) {
  json out = {{"kernel", r.kernel},
              {"initrd", r.initrd},
              {"command_line", r.command_line},
              {"memory_bytes", r.memory_bytes},
              {"vcpus", r.vcpus}};
  put(out, "ram_file", r.ram_file);
  put_start(out, r.start);
  return out;
}
Status from_json(JsonFields& fields, BootLinuxRequest& r) {
  DELTAVM_TRY(fields.text("kernel", r.kernel, true));
  DELTAVM_TRY(fields.text("initrd", r.initrd, true));
  DELTAVM_TRY(fields.text("command_line", r.command_line, true));
  DELTAVM_TRY(read_memory_bytes(fields, r.memory_bytes));
  uint64_t vcpus = r.vcpus;
  DELTAVM_TRY(fields.unsigned_integer("vcpus", vcpus, false, kMaxVcpus));
  if (vcpus == 0) return make_error(ErrorCode::kInvalidArgument, "request boot_linux: field vcpus must be at least 1");
  r.vcpus = static_cast<uint32_t>(vcpus);
  DELTAVM_TRY(fields.text("ram_file", r.ram_file));
  return read_start(fields, r.start);
}

json to_json(const RestoreRequest& r) {
  json out = {{"state", r.state},
              {"base", r.base},
              {"strategy", memory_strategy_name(r.strategy)},
              {"step_first_instruction", r.step_first_instruction},
              {"wait_first_report", r.wait_first_report}};
  put(out, "overlay", r.overlay);
  put_start(out, r.start);
  return out;
}
Status from_json(JsonFields& fields, RestoreRequest& r) {
  DELTAVM_TRY(fields.text("state", r.state, true));
  DELTAVM_TRY(fields.text("base", r.base, true));
  DELTAVM_TRY(fields.text("overlay", r.overlay));
  std::string strategy(memory_strategy_name(r.strategy));
  DELTAVM_TRY(fields.text("strategy", strategy));
  DELTAVM_ASSIGN_OR_RETURN(r.strategy, parse_memory_strategy(strategy));
  DELTAVM_TRY(fields.boolean("step_first_instruction", r.step_first_instruction));
  DELTAVM_TRY(fields.boolean("wait_first_report", r.wait_first_report));
  return read_start(fields, r.start);
}

json to_json(const StatusRequest&) { return json::object(); }
Status from_json(JsonFields&, StatusRequest&) { return {}; }
json to_json(const PauseRequest&) { return json::object(); }
Status from_json(JsonFields&, PauseRequest&) { return {}; }
json to_json(const FloorRequest&) { return json::object(); }
Status from_json(JsonFields&, FloorRequest&) { return {}; }
json to_json(const QuitRequest&) { return json::object(); }
Status from_json(JsonFields&, QuitRequest&) { return {}; }

json to_json(const ResumeRequest& r) {
  json out = json::object();
  put(out, "pause_at_checkpoint", r.pause_at_checkpoint);
  return out;
}
Status from_json(JsonFields& fields, ResumeRequest& r) {
  return fields.unsigned_integer("pause_at_checkpoint", r.pause_at_checkpoint);
}

json to_json(const WaitRequest& r) { return {{"timeout_ms", r.timeout_ms}}; }
Status from_json(JsonFields& fields, WaitRequest& r) {
  return fields.unsigned_integer("timeout_ms", r.timeout_ms, false, 24ull * 3600 * 1000);
}

json to_json(const SaveRequest& r) {
  json out = json::object();
  put(out, "state", r.state);
  put(out, "dirty", r.dirty);
  put(out, "ram", r.ram);
  put(out, "changes", r.changes);
  if (r.digest) out["digest"] = true;
  return out;
}
Status from_json(JsonFields& fields, SaveRequest& r) {
  DELTAVM_TRY(fields.text("state", r.state));
  DELTAVM_TRY(fields.text("dirty", r.dirty));
  DELTAVM_TRY(fields.text("changes", r.changes));
  DELTAVM_TRY(fields.boolean("digest", r.digest));
  return fields.text("ram", r.ram);
}

json to_json(const SerialOutputRequest& r) { return {{"port", r.port}}; }
Status from_json(JsonFields& fields, SerialOutputRequest& r) {
  uint64_t port = r.port;
  DELTAVM_TRY(fields.unsigned_integer("port", port, false, 1));
  r.port = static_cast<uint32_t>(port);
  return {};
}

json to_json(const StatusReply& r) {
  json out = {{"state", run_state_name(r.state)}};
  if (!r.failure.empty()) out["failure"] = r.failure;
  if (r.micro) {
    out["micro"] = {{"checkpoint", r.micro->checkpoint},
                    {"heartbeats", r.micro->heartbeats},
                    {"done", r.micro->done},
                    {"done_status", r.micro->done_status},
                    {"checksum", r.micro->checksum}};
  }
  if (r.userfault) {
    out["userfault"] = {{"overlay_pages", r.userfault->overlay_pages},
                        {"base_pages", r.userfault->base_pages},
                        {"zero_pages", r.userfault->zero_pages}};
  }
  if (r.timings) {
    out["timings_us"] = {{"memory", r.timings->memory_us},
                         {"machine", r.timings->machine_us},
                         {"first_instruction", r.timings->first_instruction_us},
                         {"first_report", r.timings->first_report_us}};
  }
  return out;
}
Status from_json(JsonFields& fields, StatusReply& r) {
  std::string state;
  DELTAVM_TRY(fields.text("state", state, true));
  if (state == "paused")
    r.state = RunState::kPaused;
  else if (state == "running")
    r.state = RunState::kRunning;
  else if (state == "done")
    r.state = RunState::kDone;
  else if (state == "failed")
    r.state = RunState::kFailed;
  else
    return make_error(ErrorCode::kIo, "VMM reply: unknown machine state {:?}", state);
  DELTAVM_TRY(fields.text("failure", r.failure));
  DELTAVM_ASSIGN_OR_RETURN(const json* micro, fields.object("micro"));
  if (micro != nullptr) {
    JsonFields inner(*micro, "VMM reply: micro", ErrorCode::kIo);
    MicroGuestReport report;
    uint64_t done_status = 0;
    DELTAVM_TRY(inner.unsigned_integer("checkpoint", report.checkpoint, true));
    DELTAVM_TRY(inner.unsigned_integer("heartbeats", report.heartbeats, true));
    DELTAVM_TRY(inner.boolean("done", report.done));
    DELTAVM_TRY(inner.unsigned_integer("done_status", done_status, true, UINT32_MAX));
    DELTAVM_TRY(inner.unsigned_integer("checksum", report.checksum, true));
    DELTAVM_TRY(inner.no_other_fields());
    report.done_status = static_cast<uint32_t>(done_status);
    r.micro = report;
  }
  DELTAVM_ASSIGN_OR_RETURN(const json* userfault, fields.object("userfault"));
  if (userfault != nullptr) {
    JsonFields inner(*userfault, "VMM reply: userfault", ErrorCode::kIo);
    UserfaultCounts counts;
    DELTAVM_TRY(inner.unsigned_integer("overlay_pages", counts.overlay_pages, true));
    DELTAVM_TRY(inner.unsigned_integer("base_pages", counts.base_pages, true));
    DELTAVM_TRY(inner.unsigned_integer("zero_pages", counts.zero_pages, true));
    DELTAVM_TRY(inner.no_other_fields());
    r.userfault = counts;
  }
  DELTAVM_ASSIGN_OR_RETURN(const json* timings, fields.object("timings_us"));
  if (timings != nullptr) {
    JsonFields inner(*timings, "VMM reply: timings_us", ErrorCode::kIo);
    RestoreTimings values;
    DELTAVM_TRY(inner.number("memory", values.memory_us));
    DELTAVM_TRY(inner.number("machine", values.machine_us));
    DELTAVM_TRY(inner.number("first_instruction", values.first_instruction_us));
    DELTAVM_TRY(inner.number("first_report", values.first_report_us));
    DELTAVM_TRY(inner.no_other_fields());
    r.timings = values;
  }
  return {};
}

json to_json(const SaveReply& r) {
  json out = json::object();
  put(out, "state_bytes", r.state_bytes);
  put(out, "dirty_pages", r.dirty_pages);
  put(out, "changed_pages", r.changed_pages);
  put(out, "ram_digest", r.ram_digest);
  return out;
}
Status from_json(JsonFields& fields, SaveReply& r) {
  DELTAVM_TRY(fields.unsigned_integer("state_bytes", r.state_bytes));
  DELTAVM_TRY(fields.unsigned_integer("changed_pages", r.changed_pages));
  DELTAVM_TRY(fields.text("ram_digest", r.ram_digest));
  if (r.ram_digest &&
      (r.ram_digest->size() != 32 || r.ram_digest->find_first_not_of("0123456789abcdef") != std::string::npos)) {
    return make_error(ErrorCode::kCorruption, "save reply: ram_digest must be 32 lowercase hex digits");
  }
  return fields.unsigned_integer("dirty_pages", r.dirty_pages);
}

json to_json(const SerialOutputReply& r) { return {{"text", r.text}}; }
Status from_json(JsonFields& fields, SerialOutputReply& r) { return fields.text("text", r.text, true); }

json to_json(const FloorReply& r) { return {{"floor_us", r.floor_us}}; }
Status from_json(JsonFields& fields, FloorReply& r) { return fields.number("floor_us", r.floor_us); }

json to_json(const QuitReply&) { return json::object(); }
Status from_json(JsonFields&, QuitReply&) { return {}; }

// Parses `line` as one JSON object, bounded in size; `what` names it in errors.
Result<json> parse_object(std::string_view line, std::string_view what, ErrorCode code) {
  if (line.size() > kMaxLineBytes) {
    return make_error(code, "{}: {} bytes, more than the {} allowed", what, line.size(), kMaxLineBytes);
  }
  json document = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (document.is_discarded() || !document.is_object()) {
    return make_error(code, "{}: not a JSON object", what);
  }
  return document;
}

// Tries each alternative of `Variant` whose name() matches `name`.
template <typename Variant, size_t I = 0, typename NameOf>
Result<Variant> decode_alternative(std::string_view name, JsonFields& fields, NameOf name_of, std::string_view kind,
                                   ErrorCode code) {
  if constexpr (I == std::variant_size_v<Variant>) {
    return make_error(code, "unknown {} {:?}", kind, name);
  } else {
    using T = std::variant_alternative_t<I, Variant>;
    if (name_of(static_cast<T*>(nullptr)) == name) {
      T value;
      DELTAVM_TRY(from_json(fields, value));
      DELTAVM_TRY(fields.no_other_fields());
      return Variant(std::move(value));
    }
    return decode_alternative<Variant, I + 1>(name, fields, name_of, kind, code);
  }
}

}  // namespace

Result<MemoryStrategy> parse_memory_strategy(std::string_view name) {
  if (name == "eager") return MemoryStrategy::kEager;
  if (name == "private") return MemoryStrategy::kPrivate;
  if (name == "userfault") return MemoryStrategy::kUserfault;
  return make_error(ErrorCode::kInvalidArgument, "unknown memory strategy {:?} (eager, private or userfault)", name);
}

std::string_view memory_strategy_name(MemoryStrategy strategy) {
  switch (strategy) {
    case MemoryStrategy::kEager: return "eager";
    case MemoryStrategy::kPrivate: return "private";
    case MemoryStrategy::kUserfault: return "userfault";
  }
  return "?";
}

std::string_view run_state_name(RunState state) {
  switch (state) {
    case RunState::kPaused: return "paused";
    case RunState::kRunning: return "running";
    case RunState::kDone: return "done";
    case RunState::kFailed: return "failed";
  }
  return "?";
}

std::string encode_request(const Request& request) {
  return std::visit(
      [](const auto& value) {
        json out = to_json(value);
        out["op"] = op_name<std::decay_t<decltype(value)>>();
        return dump_json(out);
      },
      request);
}

Result<Request> decode_request(std::string_view line) {
  DELTAVM_ASSIGN_OR_RETURN(json document, parse_object(line, "request", ErrorCode::kInvalidArgument));
  JsonFields op_field(document, "request", ErrorCode::kInvalidArgument);
  std::string op;
  DELTAVM_TRY(op_field.text("op", op, true));
  JsonFields fields(document, fmt::format("request {}", op), ErrorCode::kInvalidArgument);
  std::string ignored;
  DELTAVM_TRY(fields.text("op", ignored));
  return decode_alternative<Request>(
      op, fields, [](auto* type) { return op_name<std::remove_pointer_t<decltype(type)>>(); }, "request",
      ErrorCode::kInvalidArgument);
}

std::string encode_reply(const Result<Reply>& reply) {
  if (!reply) {
    return dump_json(
        {{"ok", false}, {"error", {{"code", error_code_id(reply.error().code)}, {"message", reply.error().message}}}});
  }
  return std::visit(
      [](const auto& value) {
        json out = to_json(value);
        out["ok"] = true;
        out["reply"] = reply_name<std::decay_t<decltype(value)>>();
        return dump_json(out);
      },
      *reply);
}

Result<Reply> decode_reply(std::string_view line) {
  DELTAVM_ASSIGN_OR_RETURN(json document, parse_object(line, "VMM reply", ErrorCode::kIo));
  JsonFields fields(document, "VMM reply", ErrorCode::kIo);
  bool ok = false;
  DELTAVM_TRY(fields.boolean("ok", ok));
  if (!ok) {
    DELTAVM_ASSIGN_OR_RETURN(const json* error, fields.object("error", true));
    JsonFields inner(*error, "VMM reply: error", ErrorCode::kIo);
    std::string code, message;
    DELTAVM_TRY(inner.text("code", code, true));
    DELTAVM_TRY(inner.text("message", message, true));
    std::optional<ErrorCode> parsed = parse_error_code_id(code);
    return Error{parsed.value_or(ErrorCode::kIo), message};
  }
  std::string name;
  DELTAVM_TRY(fields.text("reply", name, true));
  return decode_alternative<Reply>(
      name, fields, [](auto* type) { return reply_name<std::remove_pointer_t<decltype(type)>>(); }, "reply",
      ErrorCode::kIo);
}

}  // namespace deltavm::vmm
