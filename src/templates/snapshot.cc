#include "templates/snapshot.h"

#include <fcntl.h>
#include <sys/mman.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <ctime>

#include "base/json_fields.h"
#include "base/page.h"
#include "templates/spec.h"

namespace deltavm {
namespace {

using Clock = std::chrono::steady_clock;

double elapsed_ms(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// Writes the loader's pages into a mapping of this process.
class MappingWriter : public GuestMemoryWriter {
 public:
  explicit MappingWriter(std::span<uint8_t> memory) : memory_(memory) {}
  Status write_pages(std::span<const PageWrite> pages) override {
    for (const PageWrite& page : pages) {
      if (page.guest_physical_address + kPageSize > memory_.size()) {
        return make_error(ErrorCode::kInvalidArgument, "page at {:#x} is outside the {} bytes of RAM",
                          page.guest_physical_address, memory_.size());
      }
      std::copy_n(page.bytes, kPageSize, memory_.data() + page.guest_physical_address);
    }
    return {};
  }

 private:
  std::span<uint8_t> memory_;
};

// The image the VM was loaded from, built as its load built it: the base's flat file mapped
// private and writable, the chain's pages written over it (no flat file of the template is
// made). The capture then writes the VM's pages over it; the file stays as the store verified it.
Result<Mapping> map_image_for_capture(Store& store, const Template& loaded) {
  Loader loader(store);
  DELTAVM_ASSIGN_OR_RETURN(PreparedRam prepared, loader.prepare(loaded.chain, RamStrategy::kBasePlusDeltas));
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(prepared.flat_file(), O_RDONLY | O_CLOEXEC));
  DELTAVM_ASSIGN_OR_RETURN(Mapping ram, Mapping::map(fd.get(), loaded.machine.memory_bytes, PROT_READ | PROT_WRITE,
                                                     MAP_PRIVATE, 0, prepared.flat_file().string()));
  MappingWriter writer(ram.writable_bytes());
  DELTAVM_TRY(prepared.fill(writer));
  return ram;
}

nlohmann::json metadata_of(const ImageRecord& record) {
  nlohmann::json metadata = nlohmann::json::parse(record.metadata, nullptr, false);
  return metadata.is_object() ? metadata : nlohmann::json::object();
}

// A transient template's kind and VM ("paused", "3fa2..."), if `record` is one.
std::optional<std::pair<std::string, std::string>> transient_of(const ImageRecord& record) {
  nlohmann::json metadata = metadata_of(record);
  auto it = metadata.find("transient");
  if (it == metadata.end() || !it->is_object()) return std::nullopt;
  const nlohmann::json& transient = *it;
  if (!transient.contains("kind") || !transient["kind"].is_string() || !transient.contains("vm") ||
      !transient["vm"].is_string()) {
    return std::nullopt;
  }
  return std::pair{transient["kind"].get<std::string>(), transient["vm"].get<std::string>()};
}

// The snapshot's metadata: its template's (machine, backend, spec), and where it came from.
Result<std::string> snapshot_metadata(const ImageRecord& from, const std::string& vm_id, const std::string& transient) {
  nlohmann::json metadata = nlohmann::json::parse(from.metadata, nullptr, false);
  if (metadata.is_discarded() || !metadata.is_object()) {
    return make_error(ErrorCode::kCorruption, "template {}: its metadata is not a JSON object", from.name);
  }
  metadata["snapshot"] = {{"vm", vm_id}, {"template", from.name}, {"taken_at_unix", std::time(nullptr)}};
  metadata.erase("transient");
  if (!transient.empty()) metadata["transient"] = {{"kind", transient}, {"vm", vm_id}};
  return dump_json(metadata);
}

// Where in `chain` (base first, the VM's template last) the snapshot is stored against.
Result<size_t> parent_index(const std::vector<ImageRecord>& chain, const SnapshotOptions& options) {
  size_t top = chain.size() - 1;
  if (options.against) {
    for (size_t i = 0; i < chain.size(); ++i) {
      if (chain[i].name == *options.against) return i;
    }
    return make_error(ErrorCode::kInvalidArgument, "{} is not an ancestor of template {}", *options.against,
                      chain.back().name);
  }
  if (options.max_chain_depth > 0 && top + 1 > options.max_chain_depth) return options.max_chain_depth - 1;
  return top;
}

// The next free name "STEM-N".
Result<std::string> next_name(Store& store, const std::string& stem) {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> records, store.list());
  uint64_t last = 0;
  for (const ImageRecord& record : records) {
    if (!record.name.starts_with(stem + "-")) continue;
    std::string suffix = record.name.substr(stem.size() + 1);
    if (!suffix.empty() && suffix.size() < 10 && suffix.find_first_not_of("0123456789") == std::string::npos) {
      last = std::max<uint64_t>(last, std::stoull(suffix));
    }
  }
  return fmt::format("{}-{}", stem, last + 1);
}

}  // namespace

nlohmann::json snapshot_json(const Snapshot& snapshot) {
  return {{"template", snapshot.record.name},
          {"parent", snapshot.record.parent.value_or("")},
          {"vm", snapshot.vm_id},
          {"chain_depth", snapshot.record.chain_depth},
          {"changed_pages", snapshot.changed_pages},
          {"squashed_layers", snapshot.squashed_layers},
          {"stored_size_bytes", snapshot.record.stored_size_bytes},
          {"prepare_ms", snapshot.prepare_ms},
          {"pause_ms", snapshot.pause_ms},
          {"check_ms", snapshot.check_ms},
          {"store_ms", snapshot.store_ms}};
}

Result<Snapshot> snapshot_vm(const std::string& id, const std::string& name, Store& store, Backend& backend,
                             const std::filesystem::path& runtime, const SnapshotOptions& options) {
  if (!valid_template_name(name)) {
    return make_error(ErrorCode::kInvalidArgument,
                      "snapshot name {:?}: expected 1 to 64 letters, digits, '-', '_' or '.'", name);
  }
  DELTAVM_ASSIGN_OR_RETURN(VmDirectory vm, VmDirectory::open(runtime, id));
  DELTAVM_ASSIGN_OR_RETURN(VmRecord record, vm.read_record());
  if (record.backend != backend.name()) {
    return make_error(ErrorCode::kInvalidArgument, "VM {} runs on the {} backend, not {}", id, record.backend,
                      backend.name());
  }
  if (!record.purpose.empty()) {
    return make_error(ErrorCode::kConflict, "VM {} is a {} VM; only a VM started for use can be snapshotted", id,
                      record.purpose);
  }
  if (store.find(name)) {
    return make_error(ErrorCode::kAlreadyExists, "template {} is already in the store", name);
  }
  Result<Template> loaded = load_template(store, record.template_name);
  if (!loaded) {
    return loaded.error().with_context(fmt::format(
        "VM {} was loaded from template {}, which the snapshot is stored against", id, record.template_name));
  }
  // A template removed and built again under the same name is another image: the VM's pages
  // are changes against the image it was loaded from, and no other.
  if (!record.image_digest.empty() && record.image_digest != loaded->record().digest.hex()) {
    return make_error(ErrorCode::kConflict,
                      "VM {} was loaded from template {} as image {}; the store's {} is now image {}", id,
                      record.template_name, record.image_digest, record.template_name, loaded->record().digest.hex());
  }

  Snapshot snapshot;
  snapshot.vm_id = id;
  auto start = Clock::now();
  DELTAVM_ASSIGN_OR_RETURN(size_t parent, parent_index(loaded->chain, options));
  // The pages that may differ from the parent: what the VM changed, and what every delta
  // between the parent and its template changed.
  DirtyBitmap changed(loaded->machine.memory_bytes / kPageSize);
  for (size_t layer = parent + 1; layer < loaded->chain.size(); ++layer) {
    DELTAVM_ASSIGN_OR_RETURN(std::shared_ptr<const Delta> delta, store.read_delta_shared(loaded->chain[layer]));
    for (const PageEdit& edit : delta->edits) changed.set(edit.page_index);
    ++snapshot.squashed_layers;
  }
  DELTAVM_ASSIGN_OR_RETURN(Mapping ram, map_image_for_capture(store, *loaded));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> kernel, store.read_attachment(loaded->record(), kKernelRole));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> initramfs, store.read_attachment(loaded->record(), kInitramfsRole));
  DELTAVM_ASSIGN_OR_RETURN(std::string metadata, snapshot_metadata(loaded->record(), id, options.transient));
  snapshot.prepare_ms = elapsed_ms(start);

  start = Clock::now();
  DELTAVM_TRY(backend.pause(vm));
  Result<RamChanges> changes = backend.capture_changes(vm, ram.writable_bytes(), options.capture);
  // A capture that fails, or fails its check, leaves the VM running, whatever was asked:
  // nothing of it is lost. Without `stop` the VM runs on before the check.
  if (!changes || !options.stop) {
    Status resumed = backend.resume(vm);
    snapshot.pause_ms = elapsed_ms(start);
    if (!changes) return changes.error().with_context(fmt::format("snapshot of VM {}", id));
    if (!resumed) return resumed.error().with_context(fmt::format("VM {} after its snapshot", id));
  }
  snapshot.changed_pages = changes->pages.size();
  auto check_start = Clock::now();
  Result<std::vector<uint8_t>> state = changes->check(ram.bytes());
  snapshot.check_ms = elapsed_ms(check_start);
  if (options.stop) {
    if (!state) {
      DELTAVM_TRY(backend.resume(vm));
    } else {
      DELTAVM_TRY(stop_vm(id, backend, runtime));
    }
    snapshot.pause_ms = elapsed_ms(start);
  }
  if (!state) return state.error().with_context(fmt::format("snapshot of VM {}", id));

  start = Clock::now();
  for (uint64_t page : changes->pages) changed.set(page);
  PutOptions put;
  put.metadata = std::move(metadata);
  put.attachments = {{std::string(kMachineStateRole), *state},
                     {std::string(kKernelRole), kernel},
                     {std::string(kInitramfsRole), initramfs}};
  put.dirty = &changed;
  DELTAVM_ASSIGN_OR_RETURN(snapshot.record, store.put_image(name, ram.bytes(), loaded->chain[parent].name, put));
  snapshot.store_ms = elapsed_ms(start);
  return snapshot;
}

Result<Snapshot> pause_vm(const std::string& id, Store& store, Backend& backend, const std::filesystem::path& runtime,
                          uint32_t max_chain_depth) {
  DELTAVM_ASSIGN_OR_RETURN(VmDirectory vm, VmDirectory::open(runtime, id));
  DELTAVM_ASSIGN_OR_RETURN(VmRecord record, vm.read_record());
  SnapshotOptions options;
  options.stop = true;
  options.max_chain_depth = max_chain_depth;
  options.transient = "paused";
  // A VM resumed from its paused image and paused again is stored against that image's
  // parent, so that its previous image can go.
  if (Result<ImageRecord> from = store.find(record.template_name); from) {
    std::optional<std::pair<std::string, std::string>> transient = transient_of(*from);
    if (transient && transient->first == "paused" && transient->second == id && from->parent) {
      options.against = from->parent;
    }
  }
  DELTAVM_ASSIGN_OR_RETURN(std::string name, next_name(store, "paused-" + id));
  DELTAVM_ASSIGN_OR_RETURN(Snapshot snapshot, snapshot_vm(id, name, store, backend, runtime, options));
  (void)release_transient_template(store, runtime, record.template_name, id);
  return snapshot;
}

Result<std::optional<ImageRecord>> paused_image(Store& store, const std::string& id) {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> records, store.list());
  std::optional<ImageRecord> newest;
  for (ImageRecord& record : records) {
    std::optional<std::pair<std::string, std::string>> transient = transient_of(record);
    if (!transient || transient->first != "paused" || transient->second != id) continue;
    if (!newest || record.created_at_unix >= newest->created_at_unix) newest = std::move(record);
  }
  return newest;
}

Result<std::vector<PausedVm>> paused_vms(Store& store, const std::filesystem::path& runtime) {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> records, store.list());
  std::vector<PausedVm> paused;
  for (ImageRecord& record : records) {
    std::optional<std::pair<std::string, std::string>> transient = transient_of(record);
    if (!transient || transient->first != "paused") continue;
    if (VmDirectory::open(runtime, transient->second)) continue;  // Resumed: it runs.
    paused.push_back({transient->second, std::move(record)});
  }
  return paused;
}

Result<StartedVm> resume_paused_vm(const std::string& id, Store& store, Backend& backend,
                                   const std::filesystem::path& runtime, const StartOptions& options) {
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ImageRecord> image, paused_image(store, id));
  if (!image) return make_error(ErrorCode::kNotFound, "no paused VM {} (see deltavm ps)", id);
  StartOptions resumed = options;
  resumed.id = id;
  return start_vm(image->name, store, backend, runtime, resumed);
}

Result<Snapshot> snapshot_for_fork(const std::string& id, Store& store, Backend& backend,
                                   const std::filesystem::path& runtime, uint32_t max_chain_depth) {
  SnapshotOptions options;
  options.max_chain_depth = max_chain_depth;
  options.transient = "fork";
  DELTAVM_ASSIGN_OR_RETURN(std::string name, next_name(store, "fork-" + id));
  return snapshot_vm(id, name, store, backend, runtime, options);
}

Result<Fork> fork_vm(const std::string& id, uint32_t count, Store& store, Backend& backend,
                     const std::filesystem::path& runtime, uint32_t max_chain_depth) {
  if (count == 0) return make_error(ErrorCode::kInvalidArgument, "a fork needs a count of at least 1");
  Fork fork;
  DELTAVM_ASSIGN_OR_RETURN(fork.snapshot, snapshot_for_fork(id, store, backend, runtime, max_chain_depth));
  const std::string& name = fork.snapshot.record.name;
  DELTAVM_ASSIGN_OR_RETURN(Template loaded, load_template(store, name));
  for (uint32_t i = 0; i < count; ++i) {
    Result<StartedVm> started = start_vm(loaded, store, backend, runtime);
    if (!started) {
      for (const StartedVm& vm : fork.vms) (void)stop_vm(vm.id, backend, runtime);
      (void)release_transient_template(store, runtime, name, "");
      return started.error().with_context(fmt::format("fork {} of {} of VM {}", i + 1, count, id));
    }
    fork.vms.push_back(std::move(*started));
  }
  return fork;
}

Status release_transient_template(Store& store, const std::filesystem::path& runtime, const std::string& name,
                                  const std::string& stopped_id) {
  Result<ImageRecord> record = store.find(name);
  if (!record) return record.error().code == ErrorCode::kNotFound ? Status() : record.status();
  std::optional<std::pair<std::string, std::string>> transient = transient_of(*record);
  if (!transient) return {};
  const auto& [kind, vm_id] = *transient;
  if (kind == "paused" && vm_id != stopped_id) return {};  // Still its VM's paused image.
  DELTAVM_ASSIGN_OR_RETURN(std::vector<std::string> children, store.children(name));
  if (!children.empty()) return {};
  DELTAVM_ASSIGN_OR_RETURN(std::vector<VmDirectory> vms, VmDirectory::list(runtime));
  for (const VmDirectory& vm : vms) {
    Result<VmRecord> other = vm.read_record();
    if (other && other->id != stopped_id && other->template_name == name) return {};
  }
  Status removed = store.remove_image(name);
  if (!removed && removed.error().code != ErrorCode::kNotFound && removed.error().code != ErrorCode::kConflict) {
    return removed;
  }
  return {};
}

}  // namespace deltavm
