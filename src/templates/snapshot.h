// Snapshots of running VMs: the patent's VM2 -> VM3 delta taken live. A VM loaded from template
// T is paused, the pages it changed since the load are captured (exactly: the backend knows
// which pages it holds copies of or the guest wrote, and checks the capture against the VM's
// whole RAM), and the result is stored as a new template, a delta against T (chain depth + 1),
// with its machine state. The VM then runs on, or stays stopped.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <filesystem>
#include <string>

#include "backends/backend.h"
#include "store/store.h"
#include "templates/templates.h"

namespace deltavm {

struct SnapshotOptions {
  bool stop = false;  // Stop the VM after the capture instead of letting it run on.
  CaptureOptions capture;
};

struct Snapshot {
  ImageRecord record;
  std::string vm_id;
  uint64_t changed_pages = 0;  // Pages captured (the VM's own copies: a superset of what differs).
  double prepare_ms = 0;       // The template's image mapped, before the pause.
  double pause_ms = 0;         // VM paused -> running again (or stopped).
  double check_ms = 0;         // After the pause: checking the capture against the whole RAM.
  double store_ms = 0;         // Diff against the template, compress, write.
};

// What a snapshot reports, for the command line and the service.
nlohmann::json snapshot_json(const Snapshot& snapshot);

// Snapshots running VM `id` (started by start_vm from a template still in `store`, unchanged)
// into new template `name`. On failure nothing is stored and the VM runs on as it was.
Result<Snapshot> snapshot_vm(const std::string& id, const std::string& name, Store& store, Backend& backend,
                             const std::filesystem::path& runtime, const SnapshotOptions& options = {});

}  // namespace deltavm
