// Snapshots of running VMs: the patent's VM2 -> VM3 delta taken live. A VM loaded from template
// T is paused, the pages it changed since the load are captured (exactly: the backend knows
// which pages it holds copies of or the guest wrote, and checks the capture against the VM's
// whole RAM), and the result is stored as a new template, a delta against T (chain depth + 1),
// with its machine state. The VM then runs on, or stays stopped.
//
// Chains stay short: a snapshot that would be deeper than the configured maximum is stored
// against T's ancestor at depth max - 1 instead, its delta holding the deltas in between
// squashed with the VM's changes. Nothing stored is ever rewritten, so no load sees a chain
// change under it and no running VM's template changes.
//
// On snapshots stand pause and resume under the same id (a paused VM is a stored image and no
// process) and fork (a snapshot, then N loads). Their images are transient templates: a
// paused VM's goes when the VM, resumed from it, stops or is paused again; a fork's when the
// last VM loaded from it stops. A transient template something else was stored against stays.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "backends/backend.h"
#include "store/store.h"
#include "templates/templates.h"

namespace deltavm {

inline constexpr uint32_t kDefaultMaxChainDepth = 8;

struct SnapshotOptions {
  bool stop = false;  // Stop the VM after the capture instead of letting it run on.
  // The deepest chain a snapshot makes (0: no limit); see above.
  uint32_t max_chain_depth = kDefaultMaxChainDepth;
  // Store against this ancestor of the VM's template (the deltas between squashed in).
  std::optional<std::string> against;
  // "paused" or "fork": the snapshot is a transient template of that kind (see above).
  std::string transient;
  CaptureOptions capture;
};

struct Snapshot {
  ImageRecord record;
  std::string vm_id;
  uint64_t changed_pages = 0;    // Pages captured (the VM's own copies: a superset of what differs).
  uint64_t squashed_layers = 0;  // Deltas between the parent and the VM's template folded in.
  double prepare_ms = 0;         // The template's image mapped, before the pause.
  double pause_ms = 0;           // VM paused -> running again (or stopped).
  double check_ms = 0;           // After the pause: checking the capture against the whole RAM.
  double store_ms = 0;           // Diff against the parent, compress, write.
};

// What a snapshot reports, for the command line and the service.
nlohmann::json snapshot_json(const Snapshot& snapshot);

// Snapshots running VM `id` (started by start_vm from a template still in `store`, unchanged)
// into new template `name`. On failure nothing is stored and the VM runs on as it was.
Result<Snapshot> snapshot_vm(const std::string& id, const std::string& name, Store& store, Backend& backend,
                             const std::filesystem::path& runtime, const SnapshotOptions& options = {});

// Pauses VM `id` into the store (a snapshot, then the VM stops, freeing its memory); the
// snapshot's template is the VM's paused image.
Result<Snapshot> pause_vm(const std::string& id, Store& store, Backend& backend, const std::filesystem::path& runtime,
                          uint32_t max_chain_depth = kDefaultMaxChainDepth);

// The paused image of VM `id`, if it is paused.
Result<std::optional<ImageRecord>> paused_image(Store& store, const std::string& id);

struct PausedVm {
  std::string id;
  ImageRecord image;
};
// Every paused VM of the store (a VM of `runtime` resumed from its image runs: not paused).
Result<std::vector<PausedVm>> paused_vms(Store& store, const std::filesystem::path& runtime);

// Loads paused VM `id` back under its id, processes, files and counters as they were.
Result<StartedVm> resume_paused_vm(const std::string& id, Store& store, Backend& backend,
                                   const std::filesystem::path& runtime, const StartOptions& options = {});

struct Fork {
  Snapshot snapshot;
  std::vector<StartedVm> vms;
};

// Snapshots VM `id` (which runs on) into a transient fork template, "fork-ID-N" with the first
// N past those stored, for VMs to be loaded from.
Result<Snapshot> snapshot_for_fork(const std::string& id, Store& store, Backend& backend,
                                   const std::filesystem::path& runtime, uint32_t max_chain_depth);

// Snapshots VM `id` (which runs on) and loads `count` VMs from the snapshot. If a load fails,
// the forks already loaded are stopped and the error returned.
Result<Fork> fork_vm(const std::string& id, uint32_t count, Store& store, Backend& backend,
                     const std::filesystem::path& runtime, uint32_t max_chain_depth = kDefaultMaxChainDepth);

// After VM `stopped_id`, loaded from template `name`, stopped (or was paused): removes `name`
// if it is a transient template nothing needs any more. Anything else is left as it is.
Status release_transient_template(Store& store, const std::filesystem::path& runtime, const std::string& name,
                                  const std::string& stopped_id);

}  // namespace deltavm
