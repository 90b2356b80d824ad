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
  }
  return "unknown";
}

Error errno_error(std::string_view what, int saved_errno) {
  return Error{saved_errno == ENOENT ? ErrorCode::kNotFound : ErrorCode::kIo,
               fmt::format("{}: {}", what, std::strerror(saved_errno))};
}

}  // namespace deltavm
