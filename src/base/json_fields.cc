#include "base/json_fields.h"

namespace deltavm {
namespace {

std::string describe(const nlohmann::json& value) {
  std::string text = dump_json(value);
  return text.size() > 60 ? text.substr(0, 57) + "..." : text;
}

}  // namespace

std::string dump_json(const nlohmann::json& value, int indent) {
  return value.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

Error JsonFields::wrong(std::string_view field, std::string_view expected, const nlohmann::json& found) const {
  return make_error(code_, "{}: field {} must be {}, found {}", where_, field, expected, describe(found));
}

Error JsonFields::missing(std::string_view field) const {
  return make_error(code_, "{}: field {} is required", where_, field);
}

const nlohmann::json* JsonFields::find(std::string_view field) {
  seen_.emplace(field);
  auto it = object_.find(field);
  return it == object_.end() ? nullptr : &*it;
}

Status JsonFields::text(std::string_view field, std::string& out, bool required) {
  const nlohmann::json* value = find(field);
  if (value == nullptr) return required ? Status(missing(field)) : Status();
  if (!value->is_string()) return wrong(field, "a string", *value);
  out = value->get_ref<const std::string&>();
  return {};
}

Status JsonFields::text(std::string_view field, std::optional<std::string>& out) {
  const nlohmann::json* value = find(field);
  if (value == nullptr) return {};
  if (!value->is_string()) return wrong(field, "a string", *value);
  out = value->get_ref<const std::string&>();
  return {};
}

Status JsonFields::unsigned_integer(std::string_view field, uint64_t& out, bool required, uint64_t most) {
  const nlohmann::json* value = find(field);
  if (value == nullptr) return required ? Status(missing(field)) : Status();
  if (!value->is_number_unsigned() || value->get<uint64_t>() > most) {
    return wrong(field, most == UINT64_MAX ? "a non-negative integer" : fmt::format("an integer from 0 to {}", most),
                 *value);
  }
  out = value->get<uint64_t>();
  return {};
}

Status JsonFields::unsigned_integer(std::string_view field, std::optional<uint64_t>& out, uint64_t most) {
  uint64_t number = 0;
  bool present = object_.contains(field);
  DELTAVM_TRY(unsigned_integer(field, number, false, most));
  if (present) out = number;
  return {};
}

Status JsonFields::integer(std::string_view field, int64_t& out, bool required) {
  const nlohmann::json* value = find(field);
  if (value == nullptr) return required ? Status(missing(field)) : Status();
  if (!value->is_number_integer() || (value->is_number_unsigned() && value->get<uint64_t>() > INT64_MAX)) {
    return wrong(field, "an integer", *value);
  }
  out = value->get<int64_t>();
  return {};
}

Status JsonFields::boolean(std::string_view field, bool& out) {
  const nlohmann::json* value = find(field);
  if (value == nullptr) return {};
  if (!value->is_boolean()) return wrong(field, "true or false", *value);
  out = value->get<bool>();
  return {};
}

Status JsonFields::number(std::string_view field, double& out) {
  const nlohmann::json* value = find(field);
  if (value == nullptr) return {};
  if (!value->is_number()) return wrong(field, "a number", *value);
  out = value->get<double>();
  return {};
}

Result<const nlohmann::json*> JsonFields::object(std::string_view field, bool required) {
  const nlohmann::json* value = find(field);
  if (value == nullptr) {
    if (required) return missing(field);
    return static_cast<const nlohmann::json*>(nullptr);
  }
  if (!value->is_object()) return wrong(field, "an object", *value);
  return value;
}

Status JsonFields::no_other_fields() const {
  for (const auto& [key, value] : object_.items()) {
    if (!seen_.count(key)) return make_error(code_, "{}: unknown field {}", where_, key);
  }
  return {};
}

}  // namespace deltavm
