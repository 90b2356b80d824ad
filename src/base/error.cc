#include "base/error.h"

#include <cstring>

namespace deltavm {

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "invalid argument";
    case ErrorCode::kCorruption: return "corruption";
    case ErrorCode::kNotFound: return "not found";
    case ErrorCode::kAlreadyExists: return "already exists";
    case ErrorCode::kIo: return "I/O error";
    case ErrorCode::kUnsupported: return "unsupported";
    case ErrorCode::kBusy: return "busy";
    case ErrorCode::kConflict: return "conflict";
    case ErrorCode::kLimit: return "limit exceeded";
    case ErrorCode::kUnavailable: return "unavailable";
  }
  return "unknown";
}

namespace {
constexpr ErrorCode kAllCodes[] = {ErrorCode::kInvalidArgument,
                                   ErrorCode::kCorruption,
                                   ErrorCode::kNotFound,
                                   ErrorCode::kAlreadyExists,
                                   ErrorCode::kIo,
                                   ErrorCode::kUnsupported,
                                   ErrorCode::kBusy,
                                   ErrorCode::kConflict,
                                   ErrorCode::kLimit,
                                   ErrorCode::kUnavailable};
}  // namespace

const char* error_code_id(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "invalid_argument";
    case ErrorCode::kCorruption: return "corruption";
    case ErrorCode::kNotFound: return "not_found";
    case ErrorCode::kAlreadyExists: return "already_exists";
    case ErrorCode::kIo: return "io";
    case ErrorCode::kUnsupported: return "unsupported";
    case ErrorCode::kBusy: return "busy";
    case ErrorCode::kConflict: return "conflict";
    case ErrorCode::kLimit: return "limit";
    case ErrorCode::kUnavailable: return "unavailable";
  }
  return "unknown";
}

std::optional<ErrorCode> parse_error_code_id(std::string_view id) {
  for (ErrorCode code : kAllCodes) {
    if (id == error_code_id(code)) return code;
  }
  return std::nullopt;
}

Error errno_error(std::string_view what, int saved_errno) {
  // ESRCH: the process (a /proc entry's, say) is gone.
  return Error{saved_errno == ENOENT || saved_errno == ESRCH ? ErrorCode::kNotFound : ErrorCode::kIo,
               fmt::format("{}: {}", what, std::strerror(saved_errno))};
}

}  // namespace deltavm
