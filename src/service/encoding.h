// Bytes in JSON strings: exact as base64 (RFC 4648, padded), or as UTF-8 text.
#pragma once

#include <string>
#include <string_view>

#include "base/error.h"

namespace deltavm {

std::string base64_encode(std::string_view bytes);
// kInvalidArgument naming `what` if `text` is not padded base64.
Result<std::string> base64_decode(std::string_view text, std::string_view what);
// Whether `bytes` is well-formed UTF-8 (RFC 3629: no overlongs, surrogates or values past
// U+10FFFF).
bool valid_utf8(std::string_view bytes);

}  // namespace deltavm
