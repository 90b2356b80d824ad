// Typed reads of a JSON object's fields that never throw: a field of the wrong type (or out of
// range) is an Error naming it, a missing required field likewise, and fields nobody asked for
// can be refused. nlohmann::json's value() and get<>() throw on a wrong type; code that reads
// JSON from a file, a request or another process uses this instead.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <string_view>

#include "base/error.h"

namespace deltavm {

class JsonFields {
 public:
  // `where` prefixes every error ("request boot_linux", "vm.json of VM 1a2b"); `code` is the
  // kind of every error (kInvalidArgument for requests, kCorruption for stored records).
  // REQUIRES: object.is_object().
  JsonFields(const nlohmann::json& object, std::string where, ErrorCode code)
      : object_(object), where_(std::move(where)), code_(code) {}

  Status text(std::string_view field, std::string& out, bool required = false);
  Status text(std::string_view field, std::optional<std::string>& out);
  Status unsigned_integer(std::string_view field, uint64_t& out, bool required = false, uint64_t most = UINT64_MAX);
  Status unsigned_integer(std::string_view field, std::optional<uint64_t>& out, uint64_t most = UINT64_MAX);
  Status integer(std::string_view field, int64_t& out, bool required = false);
  Status boolean(std::string_view field, bool& out);
  Status number(std::string_view field, double& out);
  // The field's value if it is an object (for nested readers), else an error; nullptr if absent.
  Result<const nlohmann::json*> object(std::string_view field, bool required = false);
  // The field's value of whatever type, for the caller to check; nullptr if absent.
  const nlohmann::json* value(std::string_view field) { return find(field); }
  // Refuses any field no call above looked at: a misspelt field is an error, not ignored.
  Status no_other_fields() const;

 private:
  Error wrong(std::string_view field, std::string_view expected, const nlohmann::json& found) const;
  Error missing(std::string_view field) const;
  const nlohmann::json* find(std::string_view field);

  const nlohmann::json& object_;
  std::string where_;
  ErrorCode code_;
  std::set<std::string, std::less<>> seen_;
};

// A JSON text that never throws: bytes that are not UTF-8 are replaced.
std::string dump_json(const nlohmann::json& value, int indent = -1);

}  // namespace deltavm
