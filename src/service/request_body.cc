#include "service/request_body.h"

#include "base/json_fields.h"
#include "service/encoding.h"
#include "service/vm_service.h"
#include "templates/spec.h"

namespace deltavm {
namespace {

using nlohmann::json;

Result<std::string> parse_encoding(JsonFields& fields) {
  std::string encoding = "utf-8";
  DELTAVM_TRY(fields.text("encoding", encoding));
  if (encoding != "utf-8" && encoding != "base64") {
    return make_error(ErrorCode::kInvalidArgument,
                      "request body: field encoding must be \"utf-8\" or \"base64\", found {:?}", encoding);
  }
  return encoding;
}

}  // namespace

Result<json> parse_request_body(std::string_view text) {
  json body = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) return make_error(ErrorCode::kInvalidArgument, "request body: not valid JSON");
  if (!body.is_object()) return make_error(ErrorCode::kInvalidArgument, "request body: expected a JSON object");
  return body;
}

Result<CreateVmRequest> parse_create_vm(const json& body) {
  JsonFields fields(body, "request body", ErrorCode::kInvalidArgument);
  CreateVmRequest request;
  DELTAVM_TRY(fields.text("template", request.template_name, /*required=*/true));
  DELTAVM_TRY(fields.unsigned_integer("ttl_seconds", request.ttl_seconds));
  DELTAVM_TRY(fields.text("backend", request.backend));
  DELTAVM_TRY(fields.text("memory", request.memory));
  DELTAVM_TRY(fields.text("ram", request.ram));
  DELTAVM_TRY(fields.no_other_fields());
  if (request.template_name.empty() || request.template_name.size() > 64) {
    return make_error(ErrorCode::kInvalidArgument, "request body: field template must be a template name");
  }
  return request;
}

Result<SnapshotBody> parse_snapshot(const json& body) {
  JsonFields fields(body, "request body", ErrorCode::kInvalidArgument);
  SnapshotBody parsed;
  DELTAVM_TRY(fields.text("name", parsed.name, /*required=*/true));
  DELTAVM_TRY(fields.boolean("stop", parsed.stop));
  DELTAVM_TRY(fields.no_other_fields());
  if (!valid_template_name(parsed.name)) {
    return make_error(ErrorCode::kInvalidArgument,
                      "request body: field name must be 1 to 64 letters, digits, '-', '_' or '.'");
  }
  return parsed;
}

Result<uint64_t> parse_fork(const json& body) {
  JsonFields fields(body, "request body", ErrorCode::kInvalidArgument);
  uint64_t count = 1;
  DELTAVM_TRY(fields.unsigned_integer("count", count, false, kMaxForks));
  DELTAVM_TRY(fields.no_other_fields());
  if (count == 0) {
    return make_error(ErrorCode::kInvalidArgument, "request body: field count must be from 1 to {}, found 0",
                      kMaxForks);
  }
  return count;
}

std::string shell_quote(const std::vector<std::string>& arguments) {
  std::string line;
  for (const std::string& argument : arguments) {
    line += line.empty() ? "'" : " '";
    for (char c : argument) line += c == '\'' ? std::string("'\\''") : std::string(1, c);
    line += "'";
  }
  return line;
}

Result<ExecBody> parse_exec(const json& body) {
  JsonFields fields(body, "request body", ErrorCode::kInvalidArgument);
  ExecBody parsed;
  DELTAVM_ASSIGN_OR_RETURN(parsed.encoding, parse_encoding(fields));
  const json* command = fields.value("command");
  if (command == nullptr) return make_error(ErrorCode::kInvalidArgument, "request body: field command is required");
  if (!command->is_array() || command->empty() || command->size() > 4096) {
    return make_error(ErrorCode::kInvalidArgument,
                      "request body: field command must be an array of 1 to 4096 strings (the argv to run)");
  }
  std::vector<std::string> argv;
  for (const json& argument : *command) {
    if (!argument.is_string()) {
      return make_error(ErrorCode::kInvalidArgument, "request body: field command must hold strings only, found {}",
                        dump_json(argument));
    }
    argv.push_back(argument.get<std::string>());
  }
  parsed.request.command = shell_quote(argv);
  if (parsed.request.command.size() > kMaxCommandBytes) {
    return make_error(ErrorCode::kInvalidArgument, "request body: field command is longer than {} bytes quoted",
                      kMaxCommandBytes);
  }
  std::optional<std::string> input;
  DELTAVM_TRY(fields.text("stdin", input));
  if (input && parsed.encoding == "base64") {
    DELTAVM_ASSIGN_OR_RETURN(input, base64_decode(*input, "request body: field stdin"));
  }
  if (input && input->size() > kMaxStdinBytes) {
    return make_error(ErrorCode::kInvalidArgument, "request body: field stdin is more than {} bytes", kMaxStdinBytes);
  }
  parsed.request.stdin_bytes = std::move(input);
  uint64_t timeout_seconds = 60;
  DELTAVM_TRY(fields.unsigned_integer("timeout_seconds", timeout_seconds, false, kMaxExecTimeoutSeconds));
  if (timeout_seconds == 0) {
    return make_error(ErrorCode::kInvalidArgument, "request body: field timeout_seconds must be from 1 to {}, found 0",
                      kMaxExecTimeoutSeconds);
  }
  parsed.request.timeout = std::chrono::seconds(timeout_seconds);
  uint64_t max_output_bytes = kDefaultExecOutputBytes;
  DELTAVM_TRY(fields.unsigned_integer("max_output_bytes", max_output_bytes, false, kMaxOutputBytes));
  parsed.request.max_output_bytes = max_output_bytes;
  DELTAVM_TRY(fields.no_other_fields());
  return parsed;
}

Result<BuildBody> parse_build(const json& body) {
  JsonFields fields(body, "request body", ErrorCode::kInvalidArgument);
  DELTAVM_ASSIGN_OR_RETURN(const json* spec, fields.object("spec", /*required=*/true));
  BuildBody parsed;
  DELTAVM_TRY(fields.text("backend", parsed.backend));
  DELTAVM_TRY(fields.no_other_fields());
  auto absolute = [](const json& value) {
    return !value.is_string() || std::filesystem::path(value.get<std::string>()).is_absolute();
  };
  if (spec->contains("kernel") && !absolute((*spec)["kernel"])) {
    return make_error(ErrorCode::kInvalidArgument, "request body: field spec.kernel must be an absolute path");
  }
  if (auto files = spec->find("files"); files != spec->end() && files->is_array()) {
    for (size_t i = 0; i < files->size(); ++i) {
      const json& file = (*files)[i];
      if (file.is_object() && file.contains("source") && !absolute(file["source"])) {
        return make_error(ErrorCode::kInvalidArgument,
                          "request body: field spec.files[{}].source must be an absolute path on the service's host",
                          i);
      }
    }
  }
  DELTAVM_ASSIGN_OR_RETURN(parsed.spec, parse_template_spec(dump_json(*spec), "(request body field spec)"));
  return parsed;
}

Result<uint64_t> parse_pool_size(const json& body) {
  JsonFields fields(body, "request body", ErrorCode::kInvalidArgument);
  uint64_t size = 0;
  DELTAVM_TRY(fields.unsigned_integer("size", size, /*required=*/true, kMaxPoolSize));
  DELTAVM_TRY(fields.no_other_fields());
  return size;
}

}  // namespace deltavm
