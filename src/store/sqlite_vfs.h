// The catalog's SQLite file system: SQLite's own (unix) with every write, sync, truncate and
// delete checked first against the fault seam (base/faults.h), so that a test can fail each of
// SQLite's durable calls in turn. Unarmed it passes everything straight through.
#pragma once

namespace deltavm {

// Registers the file system on first use (not as the default) and returns its name, for
// sqlite3_open_v2.
const char* catalog_vfs_name();

}  // namespace deltavm
