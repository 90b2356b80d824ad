#include "templates/spec.h"

#include <nlohmann/json.hpp>

#include <set>

#include "base/file.h"
#include "base/json_fields.h"

namespace deltavm {
namespace {

using nlohmann::json;

std::string describe(const json& value) {
  std::string text = dump_json(value);
  return text.size() > 60 ? text.substr(0, 57) + "..." : text;
}

class Checker {
 public:
  // `prefix` names the enclosing object in errors, e.g. "files[2].".
  Checker(const json& object, std::string origin, std::string prefix = "")
      : object_(object), origin_(std::move(origin)), prefix_(std::move(prefix)) {}

  Error wrong(std::string_view field, std::string_view expected, const json& found) const {
    return make_error(ErrorCode::kInvalidArgument, "template spec {}: field {}{}: expected {}, found {}", origin_,
                      prefix_, field, expected, describe(found));
  }

  Status string(std::string_view field, std::string& out, bool required) const {
    auto it = object_.find(field);
    if (it == object_.end()) {
      if (required) {
        return make_error(ErrorCode::kInvalidArgument, "template spec {}: field {}{} is required", origin_, prefix_,
                          field);
      }
      return {};
    }
    if (!it->is_string()) return wrong(field, "a string", *it);
    out = it->get<std::string>();
    return {};
  }

  Status integer(std::string_view field, uint32_t& out, uint32_t low, uint32_t high) const {
    auto it = object_.find(field);
    if (it == object_.end()) return {};
    if (!it->is_number_integer() || it->get<int64_t>() < low || it->get<int64_t>() > high) {
      return wrong(field, fmt::format("an integer from {} to {}", low, high), *it);
    }
    out = static_cast<uint32_t>(it->get<int64_t>());
    return {};
  }

  Status boolean(std::string_view field, bool& out) const {
    auto it = object_.find(field);
    if (it == object_.end()) return {};
    if (!it->is_boolean()) return wrong(field, "true or false", *it);
    out = it->get<bool>();
    return {};
  }

  const std::string& origin() const { return origin_; }

 private:
  const json& object_;
  std::string origin_;
  std::string prefix_;
};

// Checks that `path` names a regular file. Every failure of the file system (no such file, a
// name too long, a loop of symbolic links) is an error naming the field, never an exception.
Status check_regular_file(const std::filesystem::path& path, const std::string& where, std::string_view field) {
  std::error_code error;
  std::filesystem::file_status status = std::filesystem::status(path, error);
  if (error && error != std::errc::no_such_file_or_directory) {
    return make_error(ErrorCode::kInvalidArgument, "template spec {}: field {}: {}: {}", where, field, path.string(),
                      error.message());
  }
  if (!std::filesystem::exists(status)) {
    return make_error(ErrorCode::kNotFound, "template spec {}: field {}: {} does not exist", where, field,
                      path.string());
  }
  if (!std::filesystem::is_regular_file(status)) {
    return make_error(ErrorCode::kInvalidArgument, "template spec {}: field {}: {} is not a regular file", where, field,
                      path.string());
  }
  return {};
}

}  // namespace

bool valid_template_name(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
          c == '.')) {
      return false;
    }
  }
  return true;
}

Result<TemplateSpec> parse_template_spec(std::string_view json_text, const std::filesystem::path& origin) {
  std::string where = origin.string();
  json document = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (document.is_discarded()) {
    return make_error(ErrorCode::kInvalidArgument, "template spec {}: not valid JSON", where);
  }
  if (!document.is_object()) {
    return make_error(ErrorCode::kInvalidArgument, "template spec {}: expected a JSON object at the top", where);
  }
  static const std::set<std::string> known = {"name",  "parent", "kernel", "command_line",  "memory_mib",
                                              "vcpus", "files",  "setup",  "deterministic", "ready_timeout_s"};
  for (const auto& [key, value] : document.items()) {
    if (!known.count(key)) {
      return make_error(ErrorCode::kInvalidArgument,
                        "template spec {}: unknown field {} (known: name, parent, "
                        "kernel, command_line, memory_mib, vcpus, files, setup, deterministic, ready_timeout_s)",
                        where, key);
    }
  }
  Checker check(document, where);
  TemplateSpec spec;
  DELTAVM_TRY(check.string("name", spec.name, true));
  if (!valid_template_name(spec.name)) {
    return check.wrong("name", "1 to 64 letters, digits, '-', '_' or '.'", document["name"]);
  }
  std::string parent;
  DELTAVM_TRY(check.string("parent", parent, false));
  if (document.contains("parent")) {
    if (!valid_template_name(parent)) return check.wrong("parent", "a template name", document["parent"]);
    spec.parent = parent;
  }
  std::filesystem::path base_directory = origin.has_parent_path() ? origin.parent_path() : ".";
  std::string kernel;
  DELTAVM_TRY(check.string("kernel", kernel, false));
  if (!kernel.empty()) {
    spec.kernel = std::filesystem::path(kernel).is_absolute() ? std::filesystem::path(kernel) : base_directory / kernel;
    DELTAVM_TRY(check_regular_file(spec.kernel, where, "kernel"));
  }
  DELTAVM_TRY(check.string("command_line", spec.command_line, false));
  DELTAVM_TRY(check.integer("memory_mib", spec.memory_mib, 32, kMaxTemplateMemoryMib));
  DELTAVM_TRY(check.integer("vcpus", spec.vcpus, 1, 8));
  DELTAVM_TRY(check.boolean("deterministic", spec.deterministic));
  DELTAVM_TRY(check.integer("ready_timeout_s", spec.ready_timeout_s, 1, 3600));
  if (auto it = document.find("setup"); it != document.end()) {
    if (!it->is_array()) return check.wrong("setup", "an array of shell commands", *it);
    for (size_t i = 0; i < it->size(); ++i) {
      if (!(*it)[i].is_string()) return check.wrong(fmt::format("setup[{}]", i), "a string", (*it)[i]);
      spec.setup.push_back((*it)[i].get<std::string>());
    }
  }
  if (auto it = document.find("files"); it != document.end()) {
    if (!it->is_array()) return check.wrong("files", "an array of {source, destination, mode}", *it);
    for (size_t i = 0; i < it->size(); ++i) {
      const json& entry = (*it)[i];
      std::string field = fmt::format("files[{}]", i);
      if (!entry.is_object()) return check.wrong(field, "an object {source, destination, mode}", entry);
      Checker file_check(entry, where, field + ".");
      TemplateFile file;
      std::string source, mode = "0644";
      DELTAVM_TRY(file_check.string("source", source, true));
      DELTAVM_TRY(file_check.string("destination", file.destination, true));
      DELTAVM_TRY(file_check.string("mode", mode, false));
      file.source =
          std::filesystem::path(source).is_absolute() ? std::filesystem::path(source) : base_directory / source;
      DELTAVM_TRY(check_regular_file(file.source, where, field + ".source"));
      if (file.destination.empty() || file.destination[0] != '/' || file.destination.find("..") != std::string::npos) {
        return file_check.wrong("destination", "an absolute guest path without '..'", entry["destination"]);
      }
      char* end = nullptr;
      unsigned long parsed = std::strtoul(mode.c_str(), &end, 8);
      if (mode.empty() || end != mode.c_str() + mode.size() || parsed > 07777) {
        return file_check.wrong("mode", "an octal string like \"0755\"", entry["mode"]);
      }
      file.mode = static_cast<uint32_t>(parsed);
      spec.files.push_back(std::move(file));
    }
  }
  return spec;
}

Result<TemplateSpec> read_template_spec(const std::filesystem::path& path) {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, read_file(path, kMaxTemplateSpecBytes));
  return parse_template_spec(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), path);
}

std::string TemplateSpec::to_json() const {
  json files_json = json::array();
  for (const TemplateFile& file : files) {
    files_json.push_back({{"source", file.source.string()},
                          {"destination", file.destination},
                          {"mode", fmt::format("{:04o}", file.mode)}});
  }
  json document = {{"name", name},
                   {"command_line", command_line},
                   {"memory_mib", memory_mib},
                   {"vcpus", vcpus},
                   {"files", files_json},
                   {"setup", setup},
                   {"deterministic", deterministic},
                   {"ready_timeout_s", ready_timeout_s}};
  if (parent) document["parent"] = *parent;
  if (!kernel.empty()) document["kernel"] = kernel.string();
  return dump_json(document);
}

}  // namespace deltavm
