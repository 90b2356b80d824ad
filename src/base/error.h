// Errors as values. Library code returns Result<T>; the command line turns an Error into one
// message on stderr and a non-zero exit status. An Error's message names what failed and where
// (file, offset, field, expected vs found), so that it can be shown to a person as it is.
#pragma once

#include <fmt/format.h>

#include <cassert>
#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace deltavm {

enum class ErrorCode {
  kInvalidArgument,  // The caller passed something that can never work.
  kCorruption,       // Stored bytes fail a check: checksum, magic, length, offset.
  kNotFound,         // A named file, object or image does not exist.
  kAlreadyExists,
  kIo,           // A system call failed; the message carries errno's text.
  kUnsupported,  // A valid input this version cannot handle (a newer format version).
  kBusy,         // A lock is held by someone else.
  kConflict,     // The request conflicts with what exists (an image others depend on).
  kLimit,        // A configured limit (VMs, memory) would be exceeded; nothing was started.
  kUnavailable,  // The service is shutting down and takes no new work.
};

const char* error_code_name(ErrorCode code);
// A stable identifier for protocols ("invalid_argument", "not_found", ...), and back.
const char* error_code_id(ErrorCode code);
std::optional<ErrorCode> parse_error_code_id(std::string_view id);

struct Error {
  ErrorCode code;
  std::string message;

  // Prefixes the message with context: "reading delta x.dvd: " + message.
  Error with_context(std::string_view context) const { return Error{code, fmt::format("{}: {}", context, message)}; }
};

template <typename... Args>
Error make_error(ErrorCode code, fmt::format_string<Args...> format, Args&&... args) {
  return Error{code, fmt::format(format, std::forward<Args>(args)...)};
}

// An Error carrying errno's text: "open /x/y: No such file or directory".
Error errno_error(std::string_view what, int saved_errno);

class Status;

// Either a T or an Error. Deliberately small: has_value / value / error, no monadic chains.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : state_(std::move(value)) {}
  Result(Error error) : state_(std::move(error)) {}

  bool has_value() const { return state_.index() == 0; }
  explicit operator bool() const { return has_value(); }

  T& value() & {
    assert(has_value());
    return std::get<0>(state_);
  }
  const T& value() const& {
    assert(has_value());
    return std::get<0>(state_);
  }
  T&& value() && {
    assert(has_value());
    return std::get<0>(std::move(state_));
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const {
    assert(!has_value());
    return std::get<1>(state_);
  }
  // The outcome without the value.
  class Status status() const;

 private:
  std::variant<T, Error> state_;
};

// Result<void>: success or an Error.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Error error) : error_(std::move(error)), ok_(false) {}

  bool ok() const { return ok_; }
  explicit operator bool() const { return ok_; }
  const Error& error() const {
    assert(!ok_);
    return error_;
  }

 private:
  Error error_{ErrorCode::kIo, ""};
  bool ok_ = true;
};

template <typename T>
Status Result<T>::status() const {
  if (has_value()) return {};
  return error();
}

}  // namespace deltavm

// Early return of an Error from a Status or Result expression (bound, not copied).
#define DELTAVM_TRY(expression)                                   \
  do {                                                            \
    auto&& deltavm_try_result_ = (expression);                    \
    if (!deltavm_try_result_) return deltavm_try_result_.error(); \
  } while (false)

#define DELTAVM_CONCAT_INNER(a, b) a##b
#define DELTAVM_CONCAT(a, b) DELTAVM_CONCAT_INNER(a, b)
// `result` is a name and `target` a declaration: neither can be put in parentheses.
// NOLINTBEGIN(bugprone-macro-parentheses)
#define DELTAVM_ASSIGN_OR_RETURN_IMPL(result, target, expression) \
  auto result = (expression);                                     \
  if (!result) return result.error();                             \
  target = std::move(result).value()
// NOLINTEND(bugprone-macro-parentheses)

// DELTAVM_ASSIGN_OR_RETURN(auto x, f()); declares x from f()'s value or returns its Error.
#define DELTAVM_ASSIGN_OR_RETURN(target, expression) \
  DELTAVM_ASSIGN_OR_RETURN_IMPL(DELTAVM_CONCAT(deltavm_result_, __LINE__), target, expression)
