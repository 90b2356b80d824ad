// deltavm-vmm: the kvm backend's per-VM process. It opens /dev/kvm once, listens on a control
// socket and runs one machine: booted, or restored from a machine state and RAM layers. The
// protocol is one JSON object per line each way (docs/kvm.md lists every request).
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>

#include "backends/kvm/guest_memory.h"
#include "backends/kvm/kvm.h"
#include "backends/kvm/machine.h"
#include "backends/kvm/machine_state.h"
#include "backends/kvm/path_policy.h"
#include "backends/kvm/serial_socket.h"
#include "base/file.h"
#include "base/socket.h"

namespace deltavm::kvm {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

double microseconds_between(Clock::time_point from, Clock::time_point to) {
  if (to == Clock::time_point{}) return -1;
  return std::chrono::duration<double, std::micro>(to - from).count();
}

Result<std::string> string_field(const json& request, const char* field) {
  auto it = request.find(field);
  if (it == request.end() || !it->is_string()) {
    return make_error(ErrorCode::kInvalidArgument, "request field '{}' must be a string", field);
  }
  return it->get<std::string>();
}

Result<uint64_t> number_field(const json& request, const char* field, std::optional<uint64_t> fallback = {}) {
  auto it = request.find(field);
  if (it == request.end() && fallback) return *fallback;
  if (it == request.end() || !it->is_number_unsigned()) {
    return make_error(ErrorCode::kInvalidArgument, "request field '{}' must be a non-negative integer", field);
  }
  return it->get<uint64_t>();
}

json status_json(const MachineStatus& status, const GuestMemory& memory) {
  json out = {{"state", machine_run_state_name(status.state)},
              {"checkpoint", status.micro.checkpoint},
              {"heartbeats", status.micro.heartbeats},
              {"done", status.micro.done},
              {"done_status", status.micro.done_status},
              {"checksum", fmt::format("{:016x}", status.micro.checksum)}};
  if (!status.failure.empty()) out["failure"] = status.failure;
  if (const UserfaultStats* stats = memory.userfault_stats()) {
    out["userfault"] = {{"overlay_pages", stats->overlay_pages.load()},
                        {"base_pages", stats->base_pages.load()},
                        {"zero_pages", stats->zero_pages.load()}};
  }
  return out;
}

class Vmm {
 public:
  Vmm(KvmSystem system, PathPolicy paths, std::unique_ptr<SerialSocket> console, std::unique_ptr<SerialSocket> agent)
      : system_(std::move(system)), paths_(std::move(paths)) {
    serial_sockets_[0] = std::move(console);
    serial_sockets_[1] = std::move(agent);
  }

  // The sockets stop feeding the machine, the machine's vCPUs stop, then the sockets go.
  ~Vmm() {
    for (auto& socket : serial_sockets_) {
      if (socket) socket->set_input(nullptr);
    }
    machine_.reset();
  }

  Result<json> handle(const json& request) {
    DELTAVM_ASSIGN_OR_RETURN(std::string op, string_field(request, "op"));
    if (op == "boot_micro") return boot_micro(request);
    if (op == "boot_linux") return boot_linux(request);
    if (op == "restore") return restore(request);
    if (op == "floor") return floor();
    if (op == "quit") return json::object();
    if (!machine_) return make_error(ErrorCode::kInvalidArgument, "'{}': no machine yet (boot or restore first)", op);
    if (op == "status") return status_json(machine_->status(), machine_->guest_memory());
    if (op == "pause") {
      DELTAVM_TRY(machine_->pause());
      return status_json(machine_->status(), machine_->guest_memory());
    }
    if (op == "resume") {
      if (request.contains("pause_at_checkpoint")) {
        DELTAVM_ASSIGN_OR_RETURN(uint64_t checkpoint, number_field(request, "pause_at_checkpoint"));
        machine_->pause_at_checkpoint(checkpoint);
      }
      DELTAVM_TRY(machine_->resume());
      return status_json(machine_->status(), machine_->guest_memory());
    }
    if (op == "wait") {
      DELTAVM_ASSIGN_OR_RETURN(uint64_t timeout_ms, number_field(request, "timeout_ms", 60000));
      return status_json(machine_->wait(std::chrono::milliseconds(timeout_ms)), machine_->guest_memory());
    }
    if (op == "save") return save(request);
    if (op == "serial_output") {
      // What the guest wrote to a serial port so far (at most the last 1 MiB).
      DELTAVM_ASSIGN_OR_RETURN(uint64_t port, number_field(request, "port", 0));
      if (port > 1) return make_error(ErrorCode::kInvalidArgument, "serial port {} does not exist (0 or 1)", port);
      std::lock_guard lock(serial_mutex_);
      return json{{"text", serial_text_[port]}};
    }
    return make_error(ErrorCode::kInvalidArgument, "unknown request '{}'", op);
  }

 private:
  Result<json> boot_micro(const json& request) {
    if (machine_) return make_error(ErrorCode::kInvalidArgument, "this VMM already runs a machine");
    DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path program_path, readable_field(request, "program"));
    DELTAVM_ASSIGN_OR_RETURN(uint64_t memory_bytes, number_field(request, "memory_bytes"));
    DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> program, read_file(program_path));
    MicroGuestParameters parameters;
    parameters.work_address = 16ull << 20;
    DELTAVM_ASSIGN_OR_RETURN(parameters.work_bytes,
                             number_field(request, "work_bytes", memory_bytes > parameters.work_address
                                                                     ? memory_bytes - parameters.work_address
                                                                     : 0));
    DELTAVM_ASSIGN_OR_RETURN(parameters.passes, number_field(request, "passes", 4));
    DELTAVM_ASSIGN_OR_RETURN(parameters.seed, number_field(request, "seed", 1));
    DELTAVM_ASSIGN_OR_RETURN(parameters.heartbeat_bytes, number_field(request, "heartbeat_bytes", 1 << 20));
    MachineOptions options;
    options.log_dirty = request.value("log_dirty", false);
    DELTAVM_ASSIGN_OR_RETURN(GuestMemory memory, boot_memory(request, memory_bytes));
    DELTAVM_ASSIGN_OR_RETURN(machine_,
                             Machine::boot_micro(system_, std::move(memory), program, parameters, options));
    return start(request);
  }

  Result<json> boot_linux(const json& request) {
    if (machine_) return make_error(ErrorCode::kInvalidArgument, "this VMM already runs a machine");
    DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path kernel_path, readable_field(request, "kernel"));
    DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path initrd_path, readable_field(request, "initrd"));
    DELTAVM_ASSIGN_OR_RETURN(std::string command_line, string_field(request, "command_line"));
    DELTAVM_ASSIGN_OR_RETURN(uint64_t memory_bytes, number_field(request, "memory_bytes"));
    DELTAVM_ASSIGN_OR_RETURN(uint64_t vcpus, number_field(request, "vcpus", 1));
    DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> kernel, read_file(kernel_path));
    DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> initrd, read_file(initrd_path));
    MachineOptions options;
    options.log_dirty = request.value("log_dirty", false);
    DELTAVM_ASSIGN_OR_RETURN(GuestMemory memory, boot_memory(request, memory_bytes));
    DELTAVM_ASSIGN_OR_RETURN(machine_, Machine::boot_linux(system_, std::move(memory), kernel, initrd, command_line,
                                                           static_cast<uint32_t>(vcpus), serial_output(), options));
    connect_serial_input();
    return start(request);
  }

  Result<json> restore(const json& request) {
    Clock::time_point received = Clock::now();
    if (machine_) return make_error(ErrorCode::kInvalidArgument, "this VMM already runs a machine");
    DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path state_path, readable_field(request, "state"));
    DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path base_path, readable_field(request, "base"));
    DELTAVM_ASSIGN_OR_RETURN(MemoryStrategy strategy,
                             parse_memory_strategy(request.value("strategy", std::string("userfault"))));
    DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> state_bytes, read_file(state_path));
    DELTAVM_ASSIGN_OR_RETURN(MachineState state, decode_machine_state(state_bytes, state_path.string()));
    RamOverlay overlay;
    if (request.contains("overlay")) {
      DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path overlay_path, readable_field(request, "overlay"));
      DELTAVM_ASSIGN_OR_RETURN(overlay, RamOverlay::open(overlay_path, state.memory_bytes / 4096));
    }
    DELTAVM_ASSIGN_OR_RETURN(GuestMemory memory,
                             GuestMemory::load(strategy, base_path, std::move(overlay), state.memory_bytes));
    Clock::time_point memory_ready = Clock::now();
    MachineOptions options;
    options.log_dirty = request.value("log_dirty", false);
    options.step_first_instruction = request.value("step_first_instruction", false);
    DELTAVM_ASSIGN_OR_RETURN(machine_, Machine::restore(system_, std::move(memory), state, options, serial_output()));
    connect_serial_input();
    Clock::time_point restored = Clock::now();
    DELTAVM_ASSIGN_OR_RETURN(json answer, start(request));
    if (request.value("wait_first_report", false)) {
      machine_->wait_first_report(std::chrono::seconds(30));
    }
    const MachineTimeline& timeline = machine_->timeline();
    answer["timings_us"] = {{"memory", microseconds_between(received, memory_ready)},
                            {"machine", microseconds_between(memory_ready, restored)},
                            {"first_instruction", microseconds_between(received, timeline.first_step)},
                            {"first_report", microseconds_between(received, timeline.first_report)}};
    return answer;
  }

  // Where a Linux guest's serial output goes: the port's socket, and a buffer the
  // serial_output request reads.
  Machine::SerialOutput serial_output() {
    return [this](int port, uint8_t byte) {
      if (serial_sockets_[port]) serial_sockets_[port]->output(byte);
      std::lock_guard lock(serial_mutex_);
      std::string& text = serial_text_[port];
      text.push_back(static_cast<char>(byte));
      if (text.size() > (2u << 20)) text.erase(0, text.size() - (1u << 20));
    };
  }

  void connect_serial_input() {
    for (int port = 0; port < 2; ++port) {
      if (!serial_sockets_[port]) continue;
      serial_sockets_[port]->set_input(
          [machine = machine_.get(), port](std::span<const uint8_t> bytes) { return machine->serial_input(port, bytes); });
    }
  }

  // RAM for a boot: in the request's ram_file (shared, so the file is the RAM image for a
  // capture), else anonymous.
  Result<GuestMemory> boot_memory(const json& request, uint64_t memory_bytes) {
    if (!request.contains("ram_file")) return GuestMemory::anonymous(memory_bytes);
    DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path ram_file, writable_field(request, "ram_file"));
    return GuestMemory::shared_file(ram_file, memory_bytes);
  }

  // Starts the machine unless the request says "paused"; may arm a checkpoint pause.
  Result<json> start(const json& request) {
    if (request.contains("pause_at_checkpoint")) {
      DELTAVM_ASSIGN_OR_RETURN(uint64_t checkpoint, number_field(request, "pause_at_checkpoint"));
      machine_->pause_at_checkpoint(checkpoint);
    }
    if (!request.value("paused", false)) DELTAVM_TRY(machine_->resume());
    return status_json(machine_->status(), machine_->guest_memory());
  }

  Result<json> save(const json& request) {
    MachineStatus status = machine_->status();
    if (status.state == MachineRunState::kRunning) {
      return make_error(ErrorCode::kInvalidArgument, "the machine is running; pause it before saving");
    }
    json answer = json::object();
    if (request.contains("state")) {
      DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path path, writable_field(request, "state"));
      DELTAVM_ASSIGN_OR_RETURN(MachineState state, machine_->save_state());
      std::vector<uint8_t> bytes = encode_machine_state(state);
      DELTAVM_TRY(write_file_atomic(path, bytes));
      answer["state_bytes"] = bytes.size();
    }
    if (request.contains("dirty")) {
      DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path path, writable_field(request, "dirty"));
      DELTAVM_ASSIGN_OR_RETURN(std::vector<uint64_t> log, machine_->take_dirty_log());
      uint64_t pages = machine_->memory().size() / 4096;
      uint64_t dirty = 0;
      for (uint64_t word : log) dirty += static_cast<uint64_t>(__builtin_popcountll(word));
      std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(log.data()), (pages + 7) / 8);
      DELTAVM_TRY(write_file_atomic(path, bytes));
      answer["dirty_pages"] = dirty;
    }
    if (request.contains("ram")) {
      DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path path, writable_field(request, "ram"));
      DELTAVM_TRY(write_file_atomic(path, machine_->memory()));
    }
    return answer;
  }

  // The floor of any restore on this host: a bare VM with one page of memory and one vCPU in
  // real mode, from nothing to its first exit (an OUT).
  Result<json> floor() {
    Clock::time_point start = Clock::now();
    DELTAVM_ASSIGN_OR_RETURN(KvmVm vm, system_.create_bare_vm());
    DELTAVM_ASSIGN_OR_RETURN(GuestMemory memory, GuestMemory::anonymous(1 << 16));
    static constexpr uint8_t kCode[] = {0xe6, 0x10, 0xf4};  // out 0x10, al; hlt
    std::memcpy(memory.bytes().data() + 0x1000, kCode, sizeof kCode);
    DELTAVM_TRY(vm.set_memory(0, 0, memory.bytes(), false));
    DELTAVM_ASSIGN_OR_RETURN(Vcpu vcpu, Vcpu::create(system_, vm, 0));
    DELTAVM_ASSIGN_OR_RETURN(kvm_sregs sregs, vcpu.sregs());
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    DELTAVM_TRY(vcpu.set_sregs(sregs));
    kvm_regs regs{};
    regs.rip = 0x1000;
    regs.rflags = 0x2;
    DELTAVM_TRY(vcpu.set_regs(regs));
    if (::ioctl(vcpu.fd(), KVM_RUN, 0) < 0) return errno_error("KVM_RUN (floor)", errno);
    Clock::time_point exited = Clock::now();
    if (vcpu.run()->exit_reason != KVM_EXIT_IO || vcpu.run()->io.port != 0x10) {
      return make_error(ErrorCode::kIo, "floor guest: exit reason {}, expected an OUT to port 0x10",
                        vcpu.run()->exit_reason);
    }
    return json{{"floor_us", microseconds_between(start, exited)}};
  }

  // A file a request names, as the path policy allows it (the error names the field).
  Result<std::filesystem::path> readable_field(const json& request, const char* field) const {
    DELTAVM_ASSIGN_OR_RETURN(std::string path, string_field(request, field));
    Result<std::filesystem::path> allowed = paths_.readable(path);
    if (!allowed) return allowed.error().with_context(fmt::format("request field '{}'", field));
    return allowed;
  }
  Result<std::filesystem::path> writable_field(const json& request, const char* field) const {
    DELTAVM_ASSIGN_OR_RETURN(std::string path, string_field(request, field));
    Result<std::filesystem::path> allowed = paths_.writable(path);
    if (!allowed) return allowed.error().with_context(fmt::format("request field '{}'", field));
    return allowed;
  }

  KvmSystem system_;
  PathPolicy paths_;
  std::unique_ptr<SerialSocket> serial_sockets_[2];
  std::unique_ptr<Machine> machine_;
  std::mutex serial_mutex_;
  std::string serial_text_[2];
};


// Serves one connection until it closes; returns true if the client asked the VMM to quit.
bool serve(Vmm& vmm, int connection) {
  std::string buffer;
  char chunk[4096];
  for (;;) {
    size_t newline;
    while ((newline = buffer.find('\n')) == std::string::npos) {
      ssize_t n = ::read(connection, chunk, sizeof chunk);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      buffer.append(chunk, static_cast<size_t>(n));
    }
    std::string line = buffer.substr(0, newline);
    buffer.erase(0, newline + 1);
    json request = json::parse(line, nullptr, false);
    json answer;
    bool quit = false;
    if (request.is_discarded() || !request.is_object()) {
      answer = {{"ok", false}, {"error", "request is not a JSON object"}};
    } else {
      Result<json> result = vmm.handle(request);
      if (result) {
        answer = std::move(result).value();
        answer["ok"] = true;
        quit = request.value("op", "") == "quit";
      } else {
        answer = {{"ok", false}, {"error", result.error().message}};
      }
    }
    std::string text = answer.dump() + "\n";
    if (::send(connection, text.data(), text.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(text.size())) return false;
    if (quit) return true;
  }
}

}  // namespace
}  // namespace deltavm::kvm

int main(int argc, char** argv) {
  using namespace deltavm;
  CLI::App app{"deltavm-vmm: runs one VM on /dev/kvm, controlled over a Unix socket"};
  std::string control;
  std::string device = "/dev/kvm";
  app.add_option("--control", control, "control socket to create")->required();
  app.add_option("--device", device, "KVM device");
  std::string console, agent, directory;
  std::vector<std::string> read_only;
  app.add_option("--console", console, "socket to serve ttyS0 on");
  app.add_option("--agent", agent, "socket to serve ttyS1 on");
  app.add_option("--directory", directory, "the VM's directory: the only place this VMM writes")->required();
  app.add_option("--read-only", read_only, "a file or directory this VMM may also read (repeatable)");
  CLI11_PARSE(app, argc, argv);
  // Sockets and files this VMM creates are its owner's alone (0600).
  ::umask(0177);
  std::vector<std::filesystem::path> read_only_paths(read_only.begin(), read_only.end());
  Result<kvm::PathPolicy> policy = kvm::PathPolicy::make(directory, read_only_paths);
  if (!policy) {
    std::fprintf(stderr, "deltavm-vmm: %s\n", policy.error().message.c_str());
    return 1;
  }

  Result<kvm::KvmSystem> system = kvm::KvmSystem::open(device);
  if (!system) {
    std::fprintf(stderr, "deltavm-vmm: %s\n", system.error().message.c_str());
    return 1;
  }
  Result<Fd> listener = listen_unix(control);
  if (!listener) {
    std::fprintf(stderr, "deltavm-vmm: %s\n", listener.error().message.c_str());
    return 1;
  }
  std::unique_ptr<kvm::SerialSocket> sockets[2];
  const std::string* paths[2] = {&console, &agent};
  for (int port = 0; port < 2; ++port) {
    if (paths[port]->empty()) continue;
    Result<std::unique_ptr<kvm::SerialSocket>> socket = kvm::SerialSocket::listen(*paths[port], port == 0 ? 64 << 10 : 0);
    if (!socket) {
      std::fprintf(stderr, "deltavm-vmm: %s\n", socket.error().message.c_str());
      return 1;
    }
    sockets[port] = std::move(socket).value();
  }
  kvm::Vmm vmm(std::move(system).value(), std::move(policy).value(), std::move(sockets[0]), std::move(sockets[1]));
  for (;;) {
    Fd connection(::accept4(listener->get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!connection.valid()) {
      if (errno == EINTR) continue;
      std::fprintf(stderr, "deltavm-vmm: accept: %s\n", std::strerror(errno));
      return 1;
    }
    if (kvm::serve(vmm, connection.get())) break;
  }
  ::unlink(control.c_str());
  return 0;
}
