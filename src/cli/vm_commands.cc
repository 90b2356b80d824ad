// deltavm template build | ls, run, exec, console, ps, stop, doctor
#include <poll.h>
#include <termios.h>
#include <unistd.h>

#include <ctime>

#include "backends/agent_client.h"
#include "backends/jail.h"
#include "backends/kvm/kvm_backend.h"
#include "backends/qemu/qemu_backend.h"
#include "base/socket.h"
#include "cli/commands.h"
#include "service/encoding.h"
#include "service/http_api.h"
#include "service/request_body.h"
#include "store/remote.h"
#include "templates/initramfs.h"
#include "templates/snapshot.h"
#include "templates/templates.h"

namespace deltavm::cli {
namespace {

// The backend that runs VM `vm`, as its record says.
Result<std::unique_ptr<Backend>> backend_of(const VmDirectory& vm) {
  DELTAVM_ASSIGN_OR_RETURN(VmRecord record, vm.read_record());
  return make_backend(record.backend.empty() ? "qemu" : record.backend);
}

Status run_template_build(const GlobalOptions& options, const std::string& spec_path, const std::string& backend_name) {
  DELTAVM_ASSIGN_OR_RETURN(TemplateSpec spec, read_template_spec(spec_path));
  DELTAVM_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, make_backend(backend_name));
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options, StoreAccess::kCreate));
  bool show = !options.json && ::isatty(STDERR_FILENO);
  DELTAVM_ASSIGN_OR_RETURN(
      TemplateBuild build,
      build_template(spec, store, *backend, runtime_directory(options), [&](std::string_view phase) {
        if (show) fmt::print(stderr, "template {}: {}...\n", spec.name, phase);
      }));
  const ImageRecord& record = build.record;
  if (options.json) {
    print_json({{"template", record.name},
                {"parent", record.parent ? nlohmann::json(*record.parent) : nlohmann::json()},
                {"parent_reason", build.parent_reason},
                {"chain_depth", record.chain_depth},
                {"image_size_bytes", record.image_size_bytes},
                {"stored_size_bytes", record.stored_size_bytes},
                {"boot_ms", build.boot_ms},
                {"capture_ms", build.capture_ms},
                {"store_ms", build.store_ms}});
    return {};
  }
  fmt::print("template {}: stored {} as {} against {} ({}); boot {}, capture {}, store {}\n", record.name,
             human_bytes(record.image_size_bytes), human_bytes(record.stored_size_bytes),
             record.parent.value_or("nothing"), build.parent_reason, human_duration_ms(build.boot_ms),
             human_duration_ms(build.capture_ms), human_duration_ms(build.store_ms));
  return {};
}

Status run_template_rm(const GlobalOptions& options, const std::string& name, bool cascade) {
  std::vector<std::string> removed;
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ServiceClient> service, connect_service(options));
  if (service) {
    DELTAVM_ASSIGN_OR_RETURN(
        nlohmann::json reply,
        service->call("DELETE", fmt::format("/v1/templates/{}{}", name, cascade ? "?cascade=true" : "")));
    if (reply.is_object() && reply.contains("removed") && reply["removed"].is_array()) {
      for (const nlohmann::json& one : reply["removed"]) {
        if (one.is_string()) removed.push_back(one.get<std::string>());
      }
    }
  } else {
    DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
    DELTAVM_ASSIGN_OR_RETURN(removed, remove_template(store, runtime_directory(options), name, cascade));
  }
  if (options.json) {
    print_json({{"removed", removed}});
  } else {
    for (const std::string& one : removed) fmt::print("removed {}\n", one);
    fmt::print("their objects are freed by the next deltavm store gc\n");
  }
  return {};
}

Status run_template_ls(const GlobalOptions& options) {
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> records, store.list());
  nlohmann::json templates = nlohmann::json::array();
  Table table({"template", "chain", "depth", "full size", "stored", "chain stored"});
  for (const ImageRecord& record : records) {
    nlohmann::json metadata = nlohmann::json::parse(record.metadata, nullptr, false);
    if (metadata.is_discarded() || !metadata.contains("machine")) continue;
    DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> chain, store.chain(record.name));
    std::string chain_text;
    uint64_t chain_bytes = 0;
    std::vector<std::string> names;
    for (const ImageRecord& link : chain) {
      chain_text += (chain_text.empty() ? "" : " <- ") + link.name;
      chain_bytes += link.stored_size_bytes;
      names.push_back(link.name);
    }
    templates.push_back({{"template", record.name},
                         {"chain", names},
                         {"chain_depth", record.chain_depth},
                         {"image_size_bytes", record.image_size_bytes},
                         {"stored_size_bytes", record.stored_size_bytes},
                         {"chain_stored_bytes", chain_bytes}});
    table.add_row({record.name, chain_text, std::to_string(record.chain_depth), human_bytes(record.image_size_bytes),
                   human_bytes(record.stored_size_bytes), human_bytes(chain_bytes)});
  }
  if (options.json)
    print_json({{"templates", templates}});
  else
    table.print();
  return {};
}

// `deltavm run` through the service: a pooled VM when its pool has one.
Status run_through_service(ServiceClient& service, const GlobalOptions& options, const std::string& name,
                           const std::string& backend_name, const std::string& strategy_name,
                           const std::string& kvm_memory) {
  nlohmann::json body = {{"template", name}};
  if (!backend_name.empty()) body["backend"] = backend_name;
  if (!kvm_memory.empty()) body["memory"] = kvm_memory;
  if (strategy_name != "base+deltas") body["ram"] = strategy_name;
  DELTAVM_ASSIGN_OR_RETURN(nlohmann::json vm, service.call("POST", "/v1/vms", body));
  if (!vm.is_object() || !vm.contains("id") || !vm["id"].is_string() || !vm.contains("timings") ||
      !vm["timings"].is_object()) {
    return make_error(ErrorCode::kIo, "the service answered POST /v1/vms without an id and timings");
  }
  if (options.json) {
    const nlohmann::json& timings = vm["timings"];
    print_json({{"id", vm["id"]},
                {"template", vm.value("template", name)},
                {"strategy", strategy_name},
                {"pooled", vm.value("pooled", false)},
                {"prepare_ms", timings.value("prepare_ms", 0.0)},
                {"launch_ms", timings.value("launch_ms", 0.0)},
                {"fill_ms", timings.value("fill_ms", 0.0)},
                {"state_ms", timings.value("state_ms", 0.0)},
                {"resume_ms", timings.value("resume_ms", 0.0)},
                {"total_ms", timings.value("total_ms", 0.0)}});
  } else {
    fmt::print("{}\n", vm["id"].get<std::string>());
  }
  return {};
}

Status run_run(const GlobalOptions& options, const std::string& name, const std::string& backend_name,
               const std::string& strategy_name, const std::string& kvm_memory, bool paused) {
  DELTAVM_ASSIGN_OR_RETURN(RamStrategy strategy, parse_ram_strategy(strategy_name));
  // A VM left paused is started here, not by the service (which adopts it once it runs).
  if (!paused) {
    DELTAVM_ASSIGN_OR_RETURN(std::optional<ServiceClient> service, connect_service(options));
    if (service) return run_through_service(*service, options, name, backend_name, strategy_name, kvm_memory);
  }
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
  // A template known only on a remote is fetched (verified) first.
  DELTAVM_ASSIGN_OR_RETURN(std::optional<PullReport> pulled,
                           pull_if_missing(store, name, ::isatty(STDERR_FILENO) != 0));
  if (pulled) {
    fmt::print(stderr, "pulled {}: {} image(s), {} objects ({})\n", name, pulled->import.added.size(),
               pulled->import.objects_fetched, human_bytes(pulled->import.bytes_fetched));
    DELTAVM_ASSIGN_OR_RETURN(EvictReport evicted, evict_unused_cache(store, runtime_directory(options), {name}));
    if (!evicted.evicted.empty()) fmt::print(stderr, "cache: evicted {}\n", fmt::join(evicted.evicted, ", "));
  }
  DELTAVM_ASSIGN_OR_RETURN(Template loaded, load_template(store, name));
  // By default, the backend that captured the template.
  std::string chosen = backend_name.empty() ? loaded.backend : backend_name;
  std::unique_ptr<Backend> backend;
  if (!kvm_memory.empty()) {
    if (chosen != "kvm") {
      return make_error(ErrorCode::kInvalidArgument, "--kvm-memory applies to the kvm backend, not {}", chosen);
    }
    DELTAVM_ASSIGN_OR_RETURN(vmm::MemoryStrategy memory, vmm::parse_memory_strategy(kvm_memory));
    backend = make_kvm_backend(memory);
  } else {
    DELTAVM_ASSIGN_OR_RETURN(backend, make_backend(chosen));
  }
  DELTAVM_ASSIGN_OR_RETURN(StartedVm vm, start_vm(loaded, store, *backend, runtime_directory(options),
                                                  {.strategy = strategy, .leave_paused = paused}));
  if (options.json) {
    print_json({{"id", vm.id},
                {"template", vm.template_name},
                {"strategy", ram_strategy_name(vm.strategy)},
                {"prepare_ms", vm.prepare_ms},
                {"launch_ms", vm.restore.launch_ms},
                {"fill_ms", vm.restore.fill_ms},
                {"state_ms", vm.restore.state_ms},
                {"identity_ms", vm.identity_ms},
                {"total_ms", vm.total_ms}});
  } else {
    fmt::print("{}\n", vm.id);
  }
  return {};
}

// Starts the vCPUs of a VM started --paused, or loads a paused VM back under its id.
Status run_resume(const GlobalOptions& options, const std::string& id) {
  std::filesystem::path runtime = runtime_directory(options);
  if (Result<VmDirectory> vm = VmDirectory::open(runtime, id); vm) {
    DELTAVM_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, backend_of(*vm));
    DELTAVM_TRY(backend->resume(*vm));
    // Loaded --paused, it runs now: it takes its own identity as every load does.
    DELTAVM_ASSIGN_OR_RETURN(VmRecord record, vm->read_record());
    DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
    DELTAVM_ASSIGN_OR_RETURN(Template loaded, load_template(store, record.template_name));
    return refresh_identity(loaded, *vm).status();
  }
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ServiceClient> service, connect_service(options));
  if (service) {
    DELTAVM_ASSIGN_OR_RETURN(nlohmann::json reply,
                             service->call("POST", fmt::format("/v1/vms/{}/resume", id), nlohmann::json::object()));
    if (options.json)
      print_json(reply);
    else
      fmt::print("{}\n", id);
    return {};
  }
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ImageRecord> image, paused_image(store, id));
  if (!image) return make_error(ErrorCode::kNotFound, "no VM {} running or paused (see deltavm ps)", id);
  DELTAVM_ASSIGN_OR_RETURN(Template loaded, load_template(store, image->name));
  DELTAVM_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, make_backend(loaded.backend));
  DELTAVM_ASSIGN_OR_RETURN(StartedVm vm, resume_paused_vm(id, store, *backend, runtime));
  if (options.json) {
    print_json({{"id", vm.id}, {"template", vm.template_name}, {"total_ms", vm.total_ms}});
  } else {
    fmt::print("{}\n", vm.id);
  }
  return {};
}

Status run_pause(const GlobalOptions& options, const std::string& id) {
  std::filesystem::path runtime = runtime_directory(options);
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ServiceClient> service, connect_service(options));
  nlohmann::json reply;
  if (service) {
    DELTAVM_ASSIGN_OR_RETURN(reply, service->call("POST", fmt::format("/v1/vms/{}/pause", id), nlohmann::json::object(),
                                                  std::chrono::seconds(600)));
  } else {
    DELTAVM_ASSIGN_OR_RETURN(VmDirectory vm, VmDirectory::open(runtime, id));
    DELTAVM_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, backend_of(vm));
    DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
    DELTAVM_ASSIGN_OR_RETURN(Snapshot snapshot, pause_vm(id, store, *backend, runtime));
    reply = snapshot_json(snapshot);
  }
  if (options.json) {
    print_json(reply);
  } else {
    fmt::print("paused {} into {} ({} stored); deltavm resume {} loads it back\n", id, reply.value("template", ""),
               human_bytes(reply.value("stored_size_bytes", uint64_t{0})), id);
  }
  return {};
}

Status run_fork(const GlobalOptions& options, const std::string& id, uint32_t count) {
  std::filesystem::path runtime = runtime_directory(options);
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ServiceClient> service, connect_service(options));
  nlohmann::json reply;
  if (service) {
    DELTAVM_ASSIGN_OR_RETURN(reply, service->call("POST", fmt::format("/v1/vms/{}/fork", id), {{"count", count}},
                                                  std::chrono::seconds(600)));
  } else {
    DELTAVM_ASSIGN_OR_RETURN(VmDirectory vm, VmDirectory::open(runtime, id));
    DELTAVM_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, backend_of(vm));
    DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
    DELTAVM_ASSIGN_OR_RETURN(Fork fork, fork_vm(id, count, store, *backend, runtime));
    nlohmann::json ids = nlohmann::json::array();
    for (const StartedVm& started : fork.vms) ids.push_back(started.id);
    reply = {{"snapshot", snapshot_json(fork.snapshot)}, {"vms", ids}};
  }
  if (options.json) {
    print_json(reply);
    return {};
  }
  if (reply.contains("vms") && reply["vms"].is_array()) {
    for (const nlohmann::json& fork_id : reply["vms"]) {
      if (fork_id.is_string()) fmt::print("{}\n", fork_id.get<std::string>());
    }
  }
  return {};
}

Status print_snapshot(const GlobalOptions& options, const nlohmann::json& snapshot) {
  if (options.json) {
    print_json(snapshot);
    return {};
  }
  fmt::print("template {}: snapshot of VM {} stored as {} against {} ({} pages captured); VM paused {}, store {}\n",
             snapshot.value("template", ""), snapshot.value("vm", ""),
             human_bytes(snapshot.value("stored_size_bytes", uint64_t{0})), snapshot.value("parent", ""),
             snapshot.value("changed_pages", uint64_t{0}), human_duration_ms(snapshot.value("pause_ms", 0.0)),
             human_duration_ms(snapshot.value("store_ms", 0.0)));
  return {};
}

struct SnapshotArguments {
  std::string id, name;
  bool stop = false;
  // Fault injection for tests: this many changed pages left out of the capture, which the
  // witness must then refuse. Direct only; the service takes no such field.
  uint64_t omit_changed_pages_for_testing = 0;
};

Status run_snapshot(const GlobalOptions& options, const SnapshotArguments& arguments) {
  const std::string& id = arguments.id;
  const std::string& name = arguments.name;
  bool stop = arguments.stop;
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ServiceClient> service, connect_service(options));
  if (service && arguments.omit_changed_pages_for_testing > 0) {
    return make_error(ErrorCode::kInvalidArgument,
                      "--omit-changed-pages-for-testing works only where no service serves the store");
  }
  if (service) {
    DELTAVM_ASSIGN_OR_RETURN(nlohmann::json reply,
                             service->call("POST", fmt::format("/v1/vms/{}/snapshots", id),
                                           {{"name", name}, {"stop", stop}}, std::chrono::seconds(600)));
    return print_snapshot(options, reply);
  }
  std::filesystem::path runtime = runtime_directory(options);
  DELTAVM_ASSIGN_OR_RETURN(VmDirectory vm, VmDirectory::open(runtime, id));
  DELTAVM_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, backend_of(vm));
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
  SnapshotOptions snapshot_options{.stop = stop};
  snapshot_options.capture.omit_pages_for_testing = arguments.omit_changed_pages_for_testing;
  DELTAVM_ASSIGN_OR_RETURN(Snapshot snapshot, snapshot_vm(id, name, store, *backend, runtime, snapshot_options));
  return print_snapshot(options, snapshot_json(snapshot));
}

// One argument is a shell command line as it is; several are quoted and joined.
std::string command_line(const std::vector<std::string>& arguments) {
  if (arguments.size() == 1) return arguments[0];
  std::string joined;
  for (const std::string& argument : arguments) {
    std::string quoted = "'";
    for (char c : argument) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
    joined += (joined.empty() ? "" : " ") + quoted + "'";
  }
  return joined;
}

// The exit status `deltavm exec` gives for a command the guest killed at its timeout, as
// timeout(1) does.
constexpr int kTimedOutExitStatus = 124;

// What the guest sends back, through the service (which speaks base64 for exact bytes).
Result<ExecResult> exec_through_service(ServiceClient& service, const std::string& id,
                                        const std::vector<std::string>& arguments, const ExecRequest& request,
                                        int timeout_s) {
  // One argument is a shell command line, as agent_exec takes it; several are the argv.
  nlohmann::json command =
      arguments.size() == 1 ? nlohmann::json{"/bin/sh", "-c", arguments[0]} : nlohmann::json(arguments);
  nlohmann::json body = {{"command", command},
                         {"encoding", "base64"},
                         {"timeout_seconds", timeout_s == 0 ? kMaxExecTimeoutSeconds : uint64_t(timeout_s)},
                         {"max_output_bytes", kMaxOutputBytes}};
  if (request.stdin_bytes) body["stdin"] = base64_encode(*request.stdin_bytes);
  // The answer comes when the command ends or the guest kills it, and the service adds little.
  auto wait = std::chrono::seconds((timeout_s == 0 ? kMaxExecTimeoutSeconds : timeout_s) + 60);
  std::string path = fmt::format("/v1/vms/{}/exec", id);
  DELTAVM_ASSIGN_OR_RETURN(nlohmann::json reply, service.call("POST", path, body, wait));
  auto text = [&](const char* field) -> Result<std::string> {
    if (!reply.is_object() || !reply.contains(field) || !reply[field].is_string()) {
      return make_error(ErrorCode::kIo, "the service's exec reply has no {}", field);
    }
    return base64_decode(reply[field].get<std::string>(), fmt::format("the service's exec reply field {}", field));
  };
  ExecResult result;
  DELTAVM_ASSIGN_OR_RETURN(result.stdout_bytes, text("stdout"));
  DELTAVM_ASSIGN_OR_RETURN(result.stderr_bytes, text("stderr"));
  auto number = [&](const char* field) {
    return reply.contains(field) && reply[field].is_number_integer() ? reply[field].get<int>() : 0;
  };
  auto flag = [&](const char* field) {
    return reply.contains(field) && reply[field].is_boolean() && reply[field].get<bool>();
  };
  result.exit_status = number("exit_code");
  result.signal = number("signal");
  result.timed_out = flag("timed_out");
  result.stdout_truncated = flag("stdout_truncated");
  result.stderr_truncated = flag("stderr_truncated");
  result.duration_ms =
      reply.contains("duration_ms") && reply["duration_ms"].is_number() ? reply["duration_ms"].get<double>() : 0;
  return result;
}

Result<int> run_exec(const GlobalOptions& options, const std::string& id, const std::vector<std::string>& arguments,
                     int timeout_s, bool pass_stdin) {
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ServiceClient> service, connect_service(options));
  std::optional<VmDirectory> vm;
  if (!service) {
    DELTAVM_ASSIGN_OR_RETURN(vm, VmDirectory::open(runtime_directory(options), id));
    if (!vm->running()) return make_error(ErrorCode::kNotFound, "VM {} is not running", id);
  }
  ExecRequest request;
  request.command = command_line(arguments);
  request.timeout = std::chrono::seconds(timeout_s);
  if (pass_stdin) {
    std::string input;
    char buffer[65536];
    for (;;) {
      ssize_t n = ::read(STDIN_FILENO, buffer, sizeof buffer);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return errno_error("read stdin", errno);
      if (n == 0) break;
      input.append(buffer, static_cast<size_t>(n));
      if (input.size() > kMaxStdinBytes) {
        return make_error(ErrorCode::kInvalidArgument, "stdin is more than the {} bytes exec takes", kMaxStdinBytes);
      }
    }
    request.stdin_bytes = std::move(input);
  }
  DELTAVM_ASSIGN_OR_RETURN(ExecResult result, service
                                                  ? exec_through_service(*service, id, arguments, request, timeout_s)
                                                  : agent_exec(vm->agent_socket(), request));
  if (options.json) {
    print_json({{"exit_status", result.exit_status},
                {"signal", result.signal},
                {"timed_out", result.timed_out},
                {"stdout", result.stdout_bytes},
                {"stderr", result.stderr_bytes},
                {"stdout_truncated", result.stdout_truncated},
                {"stderr_truncated", result.stderr_truncated},
                {"duration_ms", result.duration_ms}});
  } else {
    fwrite(result.stdout_bytes.data(), 1, result.stdout_bytes.size(), stdout);
    fwrite(result.stderr_bytes.data(), 1, result.stderr_bytes.size(), stderr);
    if (result.stdout_truncated || result.stderr_truncated) {
      fmt::print(stderr, "deltavm: output cut at {} bytes a stream\n", kMaxOutputBytes);
    }
    if (result.timed_out) fmt::print(stderr, "deltavm: the command ran past {} s and was killed\n", timeout_s);
  }
  return result.timed_out ? kTimedOutExitStatus : result.exit_status;
}

// Relays the terminal to the VM's serial console until Ctrl-] or the VM goes away. Without a
// terminal (a script piping commands in), it sends its input and then shows what the console
// prints until it has been quiet for a second.
Status run_console(const GlobalOptions& options, const std::string& id) {
  DELTAVM_ASSIGN_OR_RETURN(VmDirectory vm, VmDirectory::open(runtime_directory(options), id));
  DELTAVM_ASSIGN_OR_RETURN(Fd console, connect_unix(vm.console_socket(), deadline_after(std::chrono::seconds(5))));
  bool terminal = ::isatty(STDIN_FILENO);
  termios saved{};
  if (terminal) {
    ::tcgetattr(STDIN_FILENO, &saved);
    termios raw = saved;
    ::cfmakeraw(&raw);
    ::tcsetattr(STDIN_FILENO, TCSANOW, &raw);
    fmt::print(stderr, "connected to VM {} console; Ctrl-] to leave\r\n", id);
  }
  Status status;
  pollfd fds[2] = {{STDIN_FILENO, POLLIN, 0}, {console.get(), POLLIN, 0}};
  char buffer[65536];
  bool input_open = true;
  for (;;) {
    fds[0].fd = input_open ? STDIN_FILENO : -1;
    int ready = ::poll(fds, 2, input_open ? -1 : 1000);
    if (ready < 0) {
      if (errno == EINTR) continue;
      status = errno_error("poll", errno);
      break;
    }
    if (ready == 0) break;  // Input done and the console quiet.
    if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t n = ::read(console.get(), buffer, sizeof buffer);
      if (n <= 0) break;
      (void)!::write(STDOUT_FILENO, buffer, static_cast<size_t>(n));
    }
    if (input_open && (fds[0].revents & (POLLIN | POLLHUP))) {
      ssize_t n = ::read(STDIN_FILENO, buffer, sizeof buffer);
      if (n <= 0) {
        input_open = false;
        if (terminal) break;
        continue;
      }
      if (terminal && std::memchr(buffer, 0x1d, static_cast<size_t>(n)) != nullptr) break;
      status = send_all(console.get(), std::string_view(buffer, static_cast<size_t>(n)), "console");
      if (!status) break;
    }
  }
  if (terminal) {
    ::tcsetattr(STDIN_FILENO, TCSANOW, &saved);
    fmt::print(stderr, "\n");
  }
  return status;
}

// `deltavm ps` through the service: the VMs it hands out (its pools are in `template ls`).
Status ps_through_service(ServiceClient& service, const GlobalOptions& options) {
  DELTAVM_ASSIGN_OR_RETURN(nlohmann::json reply, service.call("GET", "/v1/vms"));
  if (!reply.is_object() || !reply.contains("vms") || !reply["vms"].is_array()) {
    return make_error(ErrorCode::kIo, "the service answered GET /v1/vms without a list of VMs");
  }
  nlohmann::json rows = nlohmann::json::array();
  Table table({"id", "template", "backend", "pid", "state"});
  for (const nlohmann::json& vm : reply["vms"]) {
    if (!vm.is_object()) continue;
    std::string id = vm.value("id", "?"), template_name = vm.value("template", "?"), backend = vm.value("backend", "?");
    int pid = vm.contains("pid") && vm["pid"].is_number_integer() ? vm["pid"].get<int>() : 0;
    rows.push_back({{"id", id}, {"template", template_name}, {"backend", backend}, {"pid", pid}, {"state", "running"}});
    table.add_row({id, template_name, backend, pid > 0 ? std::to_string(pid) : "-", "running"});
  }
  if (options.json)
    print_json({{"vms", rows}});
  else
    table.print();
  return {};
}

Status run_ps(const GlobalOptions& options) {
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ServiceClient> service, connect_service(options));
  if (service) return ps_through_service(*service, options);
  std::filesystem::path runtime = runtime_directory(options);
  DELTAVM_TRY(remove_abandoned_vms(runtime));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<VmDirectory> vms, VmDirectory::list(runtime));
  nlohmann::json rows = nlohmann::json::array();
  Table table({"id", "template", "backend", "pid", "state"});
  for (const VmDirectory& vm : vms) {
    Result<VmRecord> record = vm.read_record();
    if (!record) {
      // A damaged record is shown, not fatal: the other VMs are still listed.
      rows.push_back({{"id", vm.id()}, {"state", "unknown"}, {"error", record.error().message}});
      table.add_row({vm.id(), "?", "?", "-", "unknown: " + record.error().message});
      continue;
    }
    std::string state = record->process && process_running(*record->process) ? "running" : "exited";
    if (!record->purpose.empty() && state == "running") state += " (" + record->purpose + ")";
    int pid = record->process ? record->process->pid : 0;
    rows.push_back({{"id", vm.id()},
                    {"template", record->template_name},
                    {"backend", record->backend},
                    {"pid", pid},
                    {"state", state}});
    table.add_row({vm.id(), record->template_name.empty() ? "?" : record->template_name,
                   record->backend.empty() ? "?" : record->backend, pid > 0 ? std::to_string(pid) : "-", state});
  }
  // Paused VMs are images in the store, with no process.
  if (Result<Store> store = open_store(options); store) {
    DELTAVM_ASSIGN_OR_RETURN(std::vector<PausedVm> paused, paused_vms(*store, runtime));
    for (const PausedVm& vm : paused) {
      Result<Template> loaded = load_template(*store, vm.image.name);
      std::string backend = loaded ? loaded->backend : "?";
      rows.push_back(
          {{"id", vm.id}, {"template", vm.image.name}, {"backend", backend}, {"pid", 0}, {"state", "paused"}});
      table.add_row({vm.id, vm.image.name, backend, "-", "paused"});
    }
  }
  if (options.json)
    print_json({{"vms", rows}});
  else
    table.print();
  return {};
}

// Stops each VM; one that cannot be stopped (a damaged record names no process to stop) is
// reported and the others are still stopped. Its directory is left for a person to look at.
Status run_stop(const GlobalOptions& options, const std::vector<std::string>& ids, bool all) {
  std::filesystem::path runtime = runtime_directory(options);
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ServiceClient> service, connect_service(options));
  std::vector<std::string> targets = ids;
  if (all && service) {
    DELTAVM_ASSIGN_OR_RETURN(nlohmann::json reply, service->call("GET", "/v1/vms"));
    if (reply.is_object() && reply.contains("vms") && reply["vms"].is_array()) {
      for (const nlohmann::json& vm : reply["vms"]) {
        if (vm.is_object() && vm.contains("id") && vm["id"].is_string()) targets.push_back(vm["id"].get<std::string>());
      }
    }
  } else if (all) {
    DELTAVM_TRY(remove_abandoned_vms(runtime));
    DELTAVM_ASSIGN_OR_RETURN(std::vector<VmDirectory> vms, VmDirectory::list(runtime));
    for (const VmDirectory& vm : vms) targets.push_back(vm.id());
    if (Result<Store> store = open_store(options); store) {
      DELTAVM_ASSIGN_OR_RETURN(std::vector<PausedVm> paused, paused_vms(*store, runtime));
      for (const PausedVm& vm : paused) targets.push_back(vm.id);
    }
  }
  std::vector<std::string> stopped;
  std::optional<Error> first_failure;
  for (const std::string& id : targets) {
    Status status = [&]() -> Status {
      if (service) return service->call("DELETE", fmt::format("/v1/vms/{}", id)).status();
      Result<VmDirectory> vm = VmDirectory::open(runtime, id);
      Result<Store> store = open_store(options);
      if (!vm) {
        // A paused VM: stopping it discards its image.
        if (!store) return vm.status();
        DELTAVM_ASSIGN_OR_RETURN(std::optional<ImageRecord> image, paused_image(*store, id));
        if (!image) return vm.status();
        return release_transient_template(*store, runtime, image->name, id);
      }
      DELTAVM_ASSIGN_OR_RETURN(VmRecord record, vm->read_record());
      DELTAVM_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, backend_of(*vm));
      DELTAVM_TRY(stop_vm(id, *backend, runtime));
      // The image of a fork or of a resumed VM goes with the last VM loaded from it.
      if (store) DELTAVM_TRY(release_transient_template(*store, runtime, record.template_name, id));
      return Status();
    }();
    if (!status) {
      Error error = status.error().with_context(fmt::format("stop {}", id));
      fmt::print(stderr, "deltavm: {}: {}\n", error_code_name(error.code), error.message);
      if (!first_failure) first_failure = error;
      continue;
    }
    stopped.push_back(id);
    if (!options.json) fmt::print("stopped {}\n", id);
  }
  if (options.json) print_json({{"stopped", stopped}});
  if (first_failure)
    return make_error(first_failure->code, "{} of {} VM(s) could not be stopped", targets.size() - stopped.size(),
                      targets.size());
  return {};
}

Status run_doctor(const GlobalOptions& options) {
  Accelerator accelerator = choose_accelerator();
  Result<GuestKit> kit = GuestKit::locate();
  bool qemu_found = std::system("command -v qemu-system-x86_64 >/dev/null 2>&1") == 0;
  JailReport jail = describe_jail();
  if (options.json) {
    print_json({{"qemu", qemu_found},
                {"accelerator", accelerator.name},
                {"reason", accelerator.reason},
                {"guest_kit", kit ? nlohmann::json(kit->kernel.parent_path().string()) : nlohmann::json()},
                {"kvm_backend", describe_kvm_device()},
                {"jail", {{"qemu", jail.qemu}, {"kvm", jail.kvm}, {"cgroups", jail.cgroups}}},
                {"runtime", runtime_directory(options).string()}});
    return {};
  }
  Table table({"check", "result"}, Table::Kind::kFieldValue);
  table.add_row({"qemu-system-x86_64", qemu_found ? "found" : "MISSING (apt-get install qemu-system-x86)"});
  table.add_row({"accelerator", fmt::format("{}: {}", accelerator.name, accelerator.reason)});
  table.add_row({"kvm backend", describe_kvm_device()});
  table.add_row({"guest kit", kit ? kit->kernel.parent_path().string() : kit.error().message});
  table.add_row({"jail (qemu)", jail.qemu});
  table.add_row({"jail (kvm)", jail.kvm});
  table.add_row({"cgroups", jail.cgroups});
  table.add_row({"runtime directory", runtime_directory(options).string()});
  table.print();
  return {};
}

}  // namespace

void add_vm_commands(CLI::App& app, const GlobalOptions& options, int& exit_status) {
  auto finish = [&exit_status](const Status& status) { exit_status = status ? 0 : report_error(status.error()); };

  CLI::App* templates = app.add_subcommand("template", "Build and list VM templates");
  templates->require_subcommand(1);
  struct BuildArguments {
    std::string spec, backend = "qemu";
  };
  auto build = std::make_shared<BuildArguments>();
  CLI::App* build_command = templates->add_subcommand("build", "Boot a template spec, capture it and store it");
  build_command->add_option("SPEC", build->spec, "Template spec (JSON)")->required()->check(CLI::ExistingFile);
  build_command->add_option("--backend", build->backend, "qemu (default) or kvm");
  build_command->callback(
      [&options, build, finish] { finish(run_template_build(options, build->spec, build->backend)); });
  struct RemoveArguments {
    std::string name;
    bool cascade = false;
  };
  auto remove = std::make_shared<RemoveArguments>();
  CLI::App* remove_command = templates->add_subcommand("rm", "Remove a template (its objects go at the next store gc)");
  remove_command->add_option("NAME", remove->name)->required();
  remove_command->add_flag("--cascade", remove->cascade, "Also remove the templates stored against it");
  remove_command->callback(
      [&options, remove, finish] { finish(run_template_rm(options, remove->name, remove->cascade)); });
  templates->add_subcommand("ls", "List templates with their chains and stored sizes")->callback([&options, finish] {
    finish(run_template_ls(options));
  });

  struct RunArguments {
    std::string name, backend, strategy = "base+deltas", kvm_memory;
    bool paused = false;
  };
  auto run = std::make_shared<RunArguments>();
  CLI::App* run_command = app.add_subcommand("run", "Start a new VM equivalent to a template; prints its id");
  run_command->add_option("TEMPLATE", run->name)->required();
  run_command->add_option("--backend", run->backend, "qemu or kvm (default: the one that captured the template)");
  run_command->add_option("--ram", run->strategy, "How RAM is built: base+deltas (default) or flat");
  run_command->add_flag("--paused", run->paused, "Load RAM and state but run no vCPU until deltavm resume");
  run_command->add_option("--kvm-memory", run->kvm_memory,
                          "kvm backend: eager, private or userfault (default: $DELTAVM_KVM_MEMORY, else userfault)");
  run_command->callback([&options, run, finish] {
    finish(run_run(options, run->name, run->backend, run->strategy, run->kvm_memory, run->paused));
  });

  auto pause_id = std::make_shared<std::string>();
  CLI::App* pause_command =
      app.add_subcommand("pause", "Store a running VM in the store and stop it, freeing its memory (resume loads it)");
  pause_command->add_option("ID", *pause_id)->required();
  pause_command->callback([&options, pause_id, finish] { finish(run_pause(options, *pause_id)); });

  struct ForkArguments {
    std::string id;
    uint32_t count = 1;
  };
  auto fork = std::make_shared<ForkArguments>();
  CLI::App* fork_command = app.add_subcommand("fork", "Snapshot a running VM and start copies of it; prints their ids");
  fork_command->add_option("ID", fork->id)->required();
  fork_command->add_option("--count", fork->count, "How many copies (default 1)")->check(CLI::Range(1, 64));
  fork_command->callback([&options, fork, finish] { finish(run_fork(options, fork->id, fork->count)); });

  auto resume_id = std::make_shared<std::string>();
  CLI::App* resume_command =
      app.add_subcommand("resume", "Load a paused VM back under its id, or start the vCPUs of one run --paused");
  resume_command->add_option("ID", *resume_id)->required();
  resume_command->callback([&options, resume_id, finish] { finish(run_resume(options, *resume_id)); });

  auto snapshot = std::make_shared<SnapshotArguments>();
  CLI::App* snapshot_command =
      app.add_subcommand("snapshot", "Store what a running VM changed since its load as a new template");
  snapshot_command->add_option("ID", snapshot->id)->required();
  snapshot_command->add_option("NAME", snapshot->name, "The new template's name")->required();
  snapshot_command->add_flag("--stop", snapshot->stop, "Stop the VM after the capture instead of resuming it");
  snapshot_command
      ->add_option("--omit-changed-pages-for-testing", snapshot->omit_changed_pages_for_testing,
                   "Fault injection: leave this many changed pages out of the capture")
      ->group("");
  snapshot_command->callback([&options, snapshot, finish] { finish(run_snapshot(options, *snapshot)); });

  struct ExecArguments {
    std::string id;
    std::vector<std::string> command;
    int timeout_s = 60;
    bool pass_stdin = false;
  };
  auto exec = std::make_shared<ExecArguments>();
  CLI::App* exec_command = app.add_subcommand("exec", "Run a command in a VM: deltavm exec ID -- CMD ...");
  exec_command->add_option("ID", exec->id)->required();
  exec_command->add_option("COMMAND", exec->command, "Command (after --)")->required();
  exec_command
      ->add_option("--timeout", exec->timeout_s,
                   "Seconds the command may run before the guest kills it (0: no limit); exit status 124 then")
      ->check(CLI::Range(0, 86400 * 7));
  exec_command->add_flag("--stdin", exec->pass_stdin, "Pass this command's stdin to the guest command");
  exec_command->callback([&options, &exit_status, exec] {
    Result<int> status = run_exec(options, exec->id, exec->command, exec->timeout_s, exec->pass_stdin);
    exit_status = status ? *status : report_error(status.error());
  });

  auto console_id = std::make_shared<std::string>();
  CLI::App* console_command = app.add_subcommand("console", "Attach to a VM's serial console (Ctrl-] leaves)");
  console_command->add_option("ID", *console_id)->required();
  console_command->callback([&options, console_id, finish] { finish(run_console(options, *console_id)); });

  app.add_subcommand("ps", "List VMs")->callback([&options, finish] { finish(run_ps(options)); });

  struct StopArguments {
    std::vector<std::string> ids;
    bool all = false;
  };
  auto stop = std::make_shared<StopArguments>();
  CLI::App* stop_command = app.add_subcommand("stop", "Stop VMs");
  stop_command->add_option("ID", stop->ids);
  stop_command->add_flag("--all", stop->all, "Stop every VM");
  stop_command->callback([&options, stop, finish] { finish(run_stop(options, stop->ids, stop->all)); });

  app.add_subcommand("doctor", "Check QEMU, the accelerator and the guest kit")->callback([&options, finish] {
    finish(run_doctor(options));
  });
}

}  // namespace deltavm::cli
