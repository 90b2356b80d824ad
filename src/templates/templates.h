// Templates: booting a spec into a VM, capturing it when ready, storing its image against the
// best stored image (lineage), and starting new VMs equivalent to a stored template.
#pragma once

#include <functional>
#include <set>
#include <string>

#include "backends/backend.h"
#include "loader/loader.h"
#include "store/store.h"
#include "templates/spec.h"

namespace deltavm {

// Attachment roles of a template's image in the store.
inline constexpr std::string_view kMachineStateRole = "machine-state";
inline constexpr std::string_view kKernelRole = "kernel";
inline constexpr std::string_view kInitramfsRole = "initramfs";

struct TemplateBuild {
  ImageRecord record;
  std::string parent_reason;  // Why this parent: "spec parent", "most similar (93% of pages)", "base".
  double boot_ms = 0;         // Launch to ready.
  double capture_ms = 0;      // Pause and machine state.
  double store_ms = 0;        // Diff, compress, write.
};

// Reports a build's phases ("booting", "capturing", ...) to whoever shows progress.
using PhaseCallback = std::function<void(std::string_view phase)>;

// Boots `spec`, waits until its setup has run and its agent answers, captures RAM and machine
// state and stores them as image `spec.name`. On any failure the VM is stopped and the store is
// left as it was.
Result<TemplateBuild> build_template(const TemplateSpec& spec, Store& store, Backend& backend,
                                     const std::filesystem::path& runtime, const PhaseCallback& phase = {});

struct StartedVm {
  std::string id;
  std::string template_name;
  RamStrategy strategy;
  double prepare_ms = 0;  // Chain read, verified and squashed; flat file mapped.
  RestoreTimings restore;
  double identity_ms = 0;  // Giving the guest the host's clock and fresh entropy.
  double total_ms = 0;
};

// A stored template resolved once for a request: its chain (base first, the template last)
// and what its metadata records, parsed and checked. Everything a load reads of the catalog.
struct Template {
  std::vector<ImageRecord> chain;
  MachineSpec machine;  // Without kernel and initramfs: add_boot_files adds them.
  std::string backend;  // The backend whose machine state the template holds.
  // The protocol of the agent in its initramfs (2 for templates from before it was recorded).
  uint32_t agent_protocol = 2;

  const ImageRecord& record() const { return chain.back(); }
  const std::string& name() const { return chain.back().name; }
};

Result<Template> load_template(Store& store, const std::string& name);

// The template's kernel and initramfs as verified store objects. Verifying reads both whole,
// so only a backend that boots from them asks for them.
Status add_boot_files(Store& store, const Template& loaded, MachineSpec& machine);

struct StartOptions {
  RamStrategy strategy = RamStrategy::kBasePlusDeltas;
  // Load RAM and machine state but run no vCPU until Backend::resume.
  bool leave_paused = false;
  // This process stays the VM's recorded owner once it runs (a warm pool's VM, with purpose
  // "pool"): if it dies, the VM is abandoned (vm_directory.h). Otherwise it is the owner only
  // while the VM starts, and the running VM belongs to the runtime.
  bool stay_owner = false;
  std::string purpose;
  std::string id;  // The VM's id (a paused VM resumed keeps its own); empty: a fresh one.
};

// The patent's request: a new VM equivalent to template `loaded`, its RAM built from the base
// and the chain, its machine state loaded, running when this returns (or paused, as `options`
// say). A VM that runs has been given its own identity (refresh_identity). On any failure nothing is left running and
// the VM's directory is removed.
Result<StartedVm> start_vm(const Template& loaded, Store& store, Backend& backend, const std::filesystem::path& runtime,
                           const StartOptions& options = {});
// load_template, then start_vm.
Result<StartedVm> start_vm(const std::string& name, Store& store, Backend& backend,
                           const std::filesystem::path& runtime, const StartOptions& options = {});

// The templates the VMs of `runtime` were loaded from (running, starting, paused or pooled).
Result<std::set<std::string>> templates_in_use(const std::filesystem::path& runtime);
// The store's cache bound enforced (Store::evict_cached), with the templates the VMs of
// `runtime` use and `also` (a service's pool templates) pinned.
Result<EvictReport> evict_unused_cache(Store& store, const std::filesystem::path& runtime,
                                       const std::set<std::string>& also = {});

// Template `name` and, with `cascade`, every template stored against it, parents first.
// Without `cascade`, kConflict if others are stored against it.
Result<std::vector<std::string>> templates_to_remove(Store& store, const std::string& name, bool cascade);

// Removes template `name` from the store (its objects go at the next gc). Refused (kConflict)
// while other templates are stored against it, unless `cascade`: then they go first, deepest
// first. Refused too while a VM of `runtime` runs from any template it would remove. Returns
// the names removed.
Result<std::vector<std::string>> remove_template(Store& store, const std::filesystem::path& runtime,
                                                 const std::string& name, bool cascade);

// Gives VM `vm`, just loaded from `loaded` and running, the host's clock and fresh entropy
// (agent_refresh_identity), so that no two loads of one image share random numbers and none
// runs on the image's clock. Templates whose agent predates it are left as they are.
Result<double> refresh_identity(const Template& loaded, const VmDirectory& vm);

// Stops a VM and removes its directory.
Status stop_vm(const std::string& id, Backend& backend, const std::filesystem::path& runtime);

}  // namespace deltavm
