// Which pages of a private file mapping a process holds copies of: the pages that differ from
// the file can only be those. A MAP_PRIVATE page the process has written was copied on write
// and is anonymous from then on; one it only read still maps the file's page; one it never
// touched is not mapped at all. /proc/PID/pagemap tells them apart (Linux
// Documentation/admin-guide/mm/pagemap.rst: bit 63 present, 62 swapped, 61 file-page or
// shared-anon), so the answer is exact: no written page is missed, swapped out or not.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <vector>

#include "base/error.h"

namespace deltavm {

// The indexes (from `address`) of the pages among `pages` pages at `address` in process `pid`
// that are the process's own copies. Needs ptrace access to `pid` (root, or the same uid).
Result<std::vector<uint64_t>> private_copies(pid_t pid, uint64_t address, uint64_t pages);

}  // namespace deltavm
