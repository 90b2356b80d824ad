// The seam through which tests fail the calls that make stored data durable: every create,
// write, fsync, rename and unlink of the store's files (base/file.h's writers and the store's
// removals) and every write, sync, truncate and delete SQLite makes for the catalog
// (store/catalog.cc routes SQLite's file system through it). Unarmed, each check is one
// relaxed atomic load. Armed by a test, the Nth call from then on fails with a chosen errno,
// or ends the process on the spot as a crash would (before the call is made).
#pragma once

#include <cstdint>

namespace deltavm {

enum class DurableCall { kCreate, kWrite, kFsync, kRename, kUnlink, kTruncate };

struct FaultPlan {
  uint64_t fail_call = 0;  // 1-based index of the call to fail among those counted; 0: none.
  int error = 0;           // The errno it fails with (EIO, ENOSPC, ...), when not a crash.
  bool crash = false;      // _exit(kCrashExitStatus) instead of failing.
};

inline constexpr int kCrashExitStatus = 86;

// Starts counting calls from zero under `plan`.
void arm_faults(const FaultPlan& plan);
// Stops failing calls (and counting them).
void disarm_faults();
// How many calls were counted since arm_faults.
uint64_t fault_calls_seen();

// Called before each durable call: 0 to make it, else the errno to fail it with.
int injected_fault(DurableCall call);

}  // namespace deltavm
