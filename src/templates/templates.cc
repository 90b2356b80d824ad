#include "templates/templates.h"

#include <fcntl.h>

#include <nlohmann/json.hpp>

#include <chrono>

#include "backends/agent_client.h"
#include "base/json_fields.h"
#include "base/socket.h"
#include "templates/initramfs.h"
#include "templates/kernel_image.h"

namespace deltavm {
namespace {

using Clock = std::chrono::steady_clock;

double elapsed_ms(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

constexpr std::string_view kReadyMarker = "DELTAVM-READY";
// A guest that was running when captured answers at once once it runs again; under TCG, with
// the host busy, allow it a while.
constexpr auto kIdentityTimeout = std::chrono::seconds(30);
constexpr std::string_view kSetupFailedMarker = "DELTAVM-SETUP-FAILED";

std::string last_lines(const std::string& text, size_t count) {
  size_t position = text.size();
  for (size_t lines = 0; position > 0 && lines <= count; --position) {
    if (text[position - 1] == '\n') ++lines;
  }
  std::string tail = text.substr(position);
  std::erase(tail, '\r');
  return tail;
}

// Reads the console until the guest's /init announces readiness.
Status wait_until_ready(const VmDirectory& vm, const TemplateSpec& spec) {
  Deadline deadline = deadline_after(std::chrono::seconds(spec.ready_timeout_s));
  DELTAVM_ASSIGN_OR_RETURN(Fd console, connect_unix(vm.console_socket(), deadline));
  std::string output;
  for (;;) {
    Status status = read_some(console.get(), output, deadline, "console");
    if (output.find(kReadyMarker) != std::string::npos) return {};
    if (output.find(kSetupFailedMarker) != std::string::npos) {
      return make_error(ErrorCode::kInvalidArgument, "template {}: a setup command failed; console:\n{}", spec.name,
                        last_lines(output, 15));
    }
    if (!status) {
      return make_error(ErrorCode::kIo, "template {}: guest not ready after {} s ({}); console:\n{}", spec.name,
                        spec.ready_timeout_s, status.error().message, last_lines(output, 15));
    }
  }
}

MachineSpec machine_for(const TemplateSpec& spec, std::filesystem::path kernel, std::filesystem::path initramfs) {
  MachineSpec machine;
  machine.kernel = std::move(kernel);
  machine.initramfs = std::move(initramfs);
  machine.command_line = "console=ttyS0 panic=-1 quiet";
  // The deterministic profile: no kernel or user address randomisation, and freed pages zeroed
  // (init_on_free=1) so that what the boot left behind - the compressed kernel, the initramfs
  // archive - does not linger in free memory. Independent boots then differ in few pages.
  if (spec.deterministic) machine.command_line += " nokaslr norandmaps init_on_free=1";
  if (!spec.command_line.empty()) machine.command_line += " " + spec.command_line;
  machine.memory_bytes = static_cast<uint64_t>(spec.memory_mib) << 20;
  machine.vcpus = spec.vcpus;
  machine.deterministic = spec.deterministic;
  return machine;
}

nlohmann::json machine_json(const MachineSpec& machine) {
  return {{"command_line", machine.command_line},
          {"memory_bytes", machine.memory_bytes},
          {"vcpus", machine.vcpus},
          {"deterministic", machine.deterministic}};
}

// The machine and backend a template's metadata records, every field checked.
Status read_metadata(const ImageRecord& record, MachineSpec& machine, std::string& backend, uint32_t& agent_protocol) {
  nlohmann::json metadata = nlohmann::json::parse(record.metadata, nullptr, false);
  if (metadata.is_discarded() || !metadata.is_object() || !metadata.contains("machine")) {
    return make_error(ErrorCode::kInvalidArgument, "image {} is not a template (no machine in its metadata)",
                      record.name);
  }
  JsonFields fields(metadata, fmt::format("image {}: metadata", record.name), ErrorCode::kCorruption);
  backend = "qemu";  // Templates from before backends were recorded.
  DELTAVM_TRY(fields.text("backend", backend));
  uint64_t protocol = 2;  // Templates from before the agent's protocol was recorded.
  DELTAVM_TRY(fields.unsigned_integer("agent_protocol", protocol, false, 1000));
  agent_protocol = static_cast<uint32_t>(protocol);
  DELTAVM_ASSIGN_OR_RETURN(const nlohmann::json* m, fields.object("machine", true));
  JsonFields machine_fields(*m, fmt::format("image {}: metadata machine", record.name), ErrorCode::kCorruption);
  uint64_t vcpus = 1;
  DELTAVM_TRY(machine_fields.text("command_line", machine.command_line, true));
  DELTAVM_TRY(machine_fields.unsigned_integer("memory_bytes", machine.memory_bytes, true));
  DELTAVM_TRY(machine_fields.unsigned_integer("vcpus", vcpus, true, 64));
  DELTAVM_TRY(machine_fields.boolean("deterministic", machine.deterministic));
  machine.vcpus = static_cast<uint32_t>(vcpus);
  if (machine.memory_bytes != record.image_size_bytes) {
    return make_error(ErrorCode::kCorruption, "image {}: metadata says {} bytes of memory, the image is {}",
                      record.name, machine.memory_bytes, record.image_size_bytes);
  }
  return {};
}

// A child template is its parent plus more: the parent's setup commands and files come first.
// Its memory size must be the parent's, since its image is stored as a delta from the parent's.
Status inherit_from_parent(const ImageRecord& parent, TemplateSpec& spec) {
  nlohmann::json metadata = nlohmann::json::parse(parent.metadata, nullptr, false);
  if (metadata.is_discarded() || !metadata.contains("template")) {
    return make_error(ErrorCode::kInvalidArgument, "template {}: parent {} is not a template", spec.name, parent.name);
  }
  Result<TemplateSpec> parent_spec =
      parse_template_spec(dump_json(metadata["template"]), "(stored spec of " + parent.name + ")");
  if (!parent_spec) return parent_spec.error();
  if (parent_spec->memory_mib != spec.memory_mib) {
    return make_error(ErrorCode::kInvalidArgument, "template {}: memory_mib {} differs from its parent {}'s {}",
                      spec.name, spec.memory_mib, parent.name, parent_spec->memory_mib);
  }
  spec.setup.insert(spec.setup.begin(), parent_spec->setup.begin(), parent_spec->setup.end());
  spec.files.insert(spec.files.begin(), parent_spec->files.begin(), parent_spec->files.end());
  return {};
}

// Stops and removes a VM when a build or start fails half-way.
class VmGuard {
 public:
  VmGuard(Backend& backend, VmDirectory vm) : backend_(backend), vm_(std::move(vm)) {}
  ~VmGuard() {
    if (!armed_) return;
    (void)backend_.stop(vm_);
    (void)vm_.remove();
  }
  void release() { armed_ = false; }
  const VmDirectory& vm() const { return vm_; }

 private:
  Backend& backend_;
  VmDirectory vm_;
  bool armed_ = true;
};

}  // namespace

Result<TemplateBuild> build_template(const TemplateSpec& spec, Store& store, Backend& backend,
                                     const std::filesystem::path& runtime, const PhaseCallback& phase) {
  auto report = [&](std::string_view text) {
    if (phase) phase(text);
  };
  if (Result<ImageRecord> existing = store.find(spec.name); existing) {
    return make_error(ErrorCode::kAlreadyExists,
                      "template {} is already in the store (remove it with deltavm store rm)", spec.name);
  }
  TemplateSpec effective = spec;
  if (spec.parent) {
    Result<ImageRecord> parent = store.find(*spec.parent);
    if (!parent)
      return make_error(ErrorCode::kNotFound, "template {}: parent template {} is not in the store", spec.name,
                        *spec.parent);
    DELTAVM_TRY(inherit_from_parent(*parent, effective));
  }
  DELTAVM_ASSIGN_OR_RETURN(GuestKit kit, GuestKit::locate());
  std::filesystem::path kernel_path = effective.kernel.empty() ? kit.kernel : effective.kernel;
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> kernel, read_file(kernel_path));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> initramfs, build_initramfs(effective, kit));

  (void)remove_abandoned_vms(runtime);
  DELTAVM_ASSIGN_OR_RETURN(VmDirectory vm, VmDirectory::create(runtime));
  VmGuard guard(backend, vm);
  std::filesystem::path initramfs_path = vm.path() / "initramfs.cpio";
  DELTAVM_TRY(write_file_atomic(initramfs_path, initramfs));
  MachineSpec machine = machine_for(effective, kernel_path, initramfs_path);
  // The record names this process as the build's owner: if it dies mid-build, its VM dies
  // with it (the backend spawns it so) and the next build or ps removes the directory.
  DELTAVM_TRY(vm.update_record([&](VmRecord& record) {
    record.template_name = spec.name;
    record.purpose = "template build";
    record.owner = ProcessIdentity::self();
  }));

  TemplateBuild build;
  report("booting");
  auto start = Clock::now();
  std::filesystem::path ram_file = vm.process_directory() / "ram";
  DELTAVM_TRY(backend.boot(machine, ram_file, vm));
  DELTAVM_TRY(wait_until_ready(vm, effective));
  Result<ExecResult> ping = agent_exec(vm.agent_socket(), "true", std::chrono::seconds(spec.ready_timeout_s));
  if (!ping) return ping.error().with_context(fmt::format("template {}: command agent", spec.name));
  build.boot_ms = elapsed_ms(start);

  report("capturing");
  start = Clock::now();
  DELTAVM_TRY(backend.pause(vm));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> state, backend.save_machine_state(vm));
  DELTAVM_ASSIGN_OR_RETURN(Mapping ram, Mapping::map_file_readonly(ram_file, O_NOFOLLOW));
  // The VM process could write the file: its size is checked before its bytes are stored.
  if (ram.size() != machine.memory_bytes) {
    return make_error(ErrorCode::kCorruption, "template {}: RAM file {} is {} bytes, the VM has {}", spec.name,
                      ram_file.string(), ram.size(), machine.memory_bytes);
  }
  build.capture_ms = elapsed_ms(start);

  report("storing");
  start = Clock::now();
  std::optional<std::string> parent = spec.parent;
  build.parent_reason = "spec parent";
  if (!parent) {
    DELTAVM_ASSIGN_OR_RETURN(std::optional<Similarity> similar, store.most_similar(ram.bytes()));
    if (similar && similar->fraction_equal >= 0.5) {
      parent = similar->name;
      build.parent_reason = fmt::format("most similar ({:.0f}% of sampled pages equal)", 100 * similar->fraction_equal);
    } else {
      build.parent_reason = "base (no stored image is similar)";
    }
  }
  PutOptions options;
  options.metadata = dump_json(nlohmann::json{{"template", nlohmann::json::parse(effective.to_json(), nullptr, false)},
                                              {"machine", machine_json(machine)},
                                              {"backend", backend.name()},
                                              {"agent_protocol", kAgentProtocolVersion}});
  options.attachments = {{std::string(kMachineStateRole), state},
                         {std::string(kKernelRole), kernel},
                         {std::string(kInitramfsRole), initramfs}};
  // A base is compressed against what it repeats from its own attachments: the kernel's text
  // and the initramfs. (Deltas are not: they are small, and loads decode them.)
  if (!parent && linux_kernel_text(kernel)) {
    options.reference = {{std::string(kKernelRole), kKernelTextReferenceKind}, {std::string(kInitramfsRole), "raw"}};
  }
  if (!parent) options.encoding.merge_gap_bytes = kBaseImageMergeGapBytes;
  DELTAVM_ASSIGN_OR_RETURN(build.record, store.put_image(spec.name, ram.bytes(), parent, options));
  // The first request for this template should not pay for materialising its base.
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> chain, store.chain(spec.name));
  DELTAVM_TRY(store.flat_file(chain.front()));
  build.store_ms = elapsed_ms(start);
  return build;
}

Result<Template> load_template(Store& store, const std::string& name) {
  Template loaded;
  DELTAVM_ASSIGN_OR_RETURN(loaded.chain, store.chain(name));
  DELTAVM_TRY(read_metadata(loaded.record(), loaded.machine, loaded.backend, loaded.agent_protocol));
  return loaded;
}

Status add_boot_files(Store& store, const Template& loaded, MachineSpec& machine) {
  DELTAVM_ASSIGN_OR_RETURN(machine.kernel, store.attachment_path(loaded.record(), kKernelRole));
  DELTAVM_ASSIGN_OR_RETURN(machine.initramfs, store.attachment_path(loaded.record(), kInitramfsRole));
  return {};
}

Result<std::set<std::string>> templates_in_use(const std::filesystem::path& runtime) {
  std::set<std::string> names;
  std::error_code error;
  if (!std::filesystem::exists(runtime, error)) return names;
  DELTAVM_ASSIGN_OR_RETURN(std::vector<VmDirectory> vms, VmDirectory::list(runtime));
  for (const VmDirectory& vm : vms) {
    Result<VmRecord> record = vm.read_record();
    // A VM whose record cannot be read pins nothing; one being created has none yet, and the
    // start that makes it holds the template's images until the VM runs.
    if (record && !record->template_name.empty()) names.insert(record->template_name);
  }
  return names;
}

Result<EvictReport> evict_unused_cache(Store& store, const std::filesystem::path& runtime,
                                       const std::set<std::string>& also) {
  DELTAVM_ASSIGN_OR_RETURN(std::set<std::string> pinned, templates_in_use(runtime));
  pinned.insert(also.begin(), also.end());
  return store.evict_cached(pinned);
}

Result<StartedVm> start_vm(const Template& loaded, Store& store, Backend& backend, const std::filesystem::path& runtime,
                           const StartOptions& options) {
  auto start = Clock::now();
  const std::string& name = loaded.name();
  // For the cache's eviction order. A failed note costs only that order, never the load.
  (void)store.touch(name);
  if (loaded.backend != backend.name()) {
    return make_error(ErrorCode::kInvalidArgument,
                      "template {} was captured by the {} backend; the {} backend cannot load its machine state", name,
                      loaded.backend, backend.name());
  }
  MachineSpec machine = loaded.machine;
  // Verifying the kernel and initramfs reads them whole: only for a backend that uses them.
  if (backend.restore_needs_boot_files()) DELTAVM_TRY(add_boot_files(store, loaded, machine));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> state, store.read_attachment(loaded.record(), kMachineStateRole));
  Loader loader(store);
  DELTAVM_ASSIGN_OR_RETURN(PreparedRam ram, loader.prepare(loaded.chain, options.strategy));

  DELTAVM_ASSIGN_OR_RETURN(VmDirectory vm, VmDirectory::create(runtime, options.id));
  VmGuard guard(backend, vm);
  // Owned while it starts: if this process dies half-way, whoever finds the VM ends it.
  DELTAVM_TRY(vm.update_record([&](VmRecord& vm_record) {
    vm_record.template_name = name;
    vm_record.image_digest = loaded.record().digest.hex();
    vm_record.strategy = ram_strategy_name(options.strategy);
    vm_record.memory_bytes = machine.memory_bytes;
    vm_record.purpose = options.purpose;
    vm_record.owner = ProcessIdentity::self();
  }));
  StartedVm started;
  started.id = vm.id();
  started.template_name = name;
  started.strategy = options.strategy;
  started.prepare_ms = ram.prepare_ms();
  DELTAVM_ASSIGN_OR_RETURN(started.restore,
                           backend.restore(
                               machine, ram.flat_file(), [&ram](GuestMemoryWriter& writer) { return ram.fill(writer); },
                               state, vm, options.leave_paused));
  if (!options.leave_paused) {
    DELTAVM_ASSIGN_OR_RETURN(started.identity_ms, refresh_identity(loaded, vm));
  }
  if (!options.stay_owner) DELTAVM_TRY(vm.update_record([](VmRecord& vm_record) { vm_record.owner.reset(); }));
  started.total_ms = elapsed_ms(start);
  guard.release();
  return started;
}

Result<StartedVm> start_vm(const std::string& name, Store& store, Backend& backend,
                           const std::filesystem::path& runtime, const StartOptions& options) {
  DELTAVM_ASSIGN_OR_RETURN(Template loaded, load_template(store, name));
  return start_vm(loaded, store, backend, runtime, options);
}

Result<std::vector<std::string>> templates_to_remove(Store& store, const std::string& name, bool cascade) {
  DELTAVM_TRY(store.find(name).status());
  std::vector<std::string> doomed = {name};
  for (size_t i = 0; i < doomed.size(); ++i) {
    DELTAVM_ASSIGN_OR_RETURN(std::vector<std::string> children, store.children(doomed[i]));
    if (!children.empty() && !cascade) {
      return make_error(ErrorCode::kConflict,
                        "template {} has {} template(s) stored against it ({}); cascade removes them too", name,
                        children.size(), fmt::join(children, ", "));
    }
    doomed.insert(doomed.end(), children.begin(), children.end());
  }
  return doomed;
}

Result<std::vector<std::string>> remove_template(Store& store, const std::filesystem::path& runtime,
                                                 const std::string& name, bool cascade) {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<std::string> doomed, templates_to_remove(store, name, cascade));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<VmDirectory> vms, VmDirectory::list(runtime));
  for (const VmDirectory& vm : vms) {
    Result<VmRecord> record = vm.read_record();
    if (record && std::find(doomed.begin(), doomed.end(), record->template_name) != doomed.end()) {
      return make_error(ErrorCode::kConflict, "template {} is in use by VM {}", record->template_name, vm.id());
    }
  }
  std::vector<std::string> removed;
  for (auto it = doomed.rbegin(); it != doomed.rend(); ++it) {
    DELTAVM_TRY(store.remove_image(*it));
    removed.push_back(*it);
  }
  return removed;
}

Result<double> refresh_identity(const Template& loaded, const VmDirectory& vm) {
  if (loaded.agent_protocol < 3) return 0.0;
  auto start = Clock::now();
  DELTAVM_TRY(agent_refresh_identity(vm.agent_socket(), kIdentityTimeout));
  return elapsed_ms(start);
}

Status stop_vm(const std::string& id, Backend& backend, const std::filesystem::path& runtime) {
  DELTAVM_ASSIGN_OR_RETURN(VmDirectory vm, VmDirectory::open(runtime, id));
  DELTAVM_TRY(backend.stop(vm));
  return vm.remove();
}

}  // namespace deltavm
