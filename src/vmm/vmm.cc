#include "vmm/vmm.h"

#include <chrono>

#include "base/page.h"
#include "vmm/machine_state.h"
#include "vmm/restore_probe.h"

namespace deltavm::vmm {
namespace {

using Clock = std::chrono::steady_clock;

// The largest files a request may make the VMM read: a bzImage, an initramfs, a micro-guest
// program (a saved machine state: kMaxStateBytes).
constexpr uint64_t kMaxKernelBytes = 256ull << 20;
constexpr uint64_t kMaxInitrdBytes = 1ull << 30;
constexpr uint64_t kMaxProgramBytes = 16ull << 20;
// What serial_output keeps of each port.
constexpr size_t kSerialHistoryBytes = 1 << 20;
constexpr uint64_t kMicroWorkAddress = 16ull << 20;

double microseconds_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double, std::micro>(to - from).count();
}

}  // namespace

Vmm::Vmm(KvmSystem system, PathPolicy paths, std::unique_ptr<SerialSocket> console, std::unique_ptr<SerialSocket> agent,
         Result<Fd> userfault)
    : system_(std::move(system)), paths_(std::move(paths)) {
  if (userfault) {
    userfault_ = std::move(userfault).value();
  } else {
    userfault_error_ = userfault.error().message;
  }
  serial_sockets_[0] = std::move(console);
  serial_sockets_[1] = std::move(agent);
}

Vmm::~Vmm() {
  for (auto& socket : serial_sockets_) {
    if (socket) socket->set_input(nullptr);
  }
  machine_.reset();
}

Result<Reply> Vmm::handle(const Request& request) {
  return std::visit([this](const auto& typed) { return handle(typed); }, request);
}

Status Vmm::require_machine() const {
  if (!machine_) return make_error(ErrorCode::kInvalidArgument, "no machine yet (boot or restore first)");
  return {};
}

Status Vmm::require_no_machine() const {
  if (machine_) return make_error(ErrorCode::kAlreadyExists, "this VMM already runs a machine");
  return {};
}

Result<std::filesystem::path> Vmm::readable(const std::string& path, std::string_view field) const {
  Result<std::filesystem::path> allowed = paths_.readable(path);
  if (!allowed) return allowed.error().with_context(fmt::format("request field '{}'", field));
  return allowed;
}

Result<std::filesystem::path> Vmm::writable(const std::string& path, std::string_view field) const {
  Result<std::filesystem::path> allowed = paths_.writable(path);
  if (!allowed) return allowed.error().with_context(fmt::format("request field '{}'", field));
  return allowed;
}

StatusReply Vmm::status_reply(const MachineStatus& status) const {
  StatusReply reply;
  reply.state = status.state;
  reply.failure = status.failure;
  if (const MicroGuestDevice* micro = machine_->micro_guest()) reply.micro = micro->report();
  if (const UserfaultStats* stats = machine_->guest_memory().userfault_stats()) {
    reply.userfault = UserfaultCounts{stats->overlay_pages.load(), stats->base_pages.load(), stats->zero_pages.load()};
  }
  return reply;
}

Result<GuestMemory> Vmm::boot_memory(const std::optional<std::string>& ram_file, uint64_t memory_bytes) {
  if (!ram_file) return GuestMemory::anonymous(memory_bytes);
  DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path path, writable(*ram_file, "ram_file"));
  return GuestMemory::shared_file(path, memory_bytes);
}

Result<StatusReply> Vmm::start(const StartOptions& start) {
  if (start.pause_at_checkpoint) {
    MicroGuestDevice* micro = machine_->micro_guest();
    if (micro == nullptr) {
      return make_error(ErrorCode::kInvalidArgument, "pause_at_checkpoint: this machine is not the micro guest");
    }
    micro->pause_at_checkpoint(*start.pause_at_checkpoint);
  }
  if (!start.paused) DELTAVM_TRY(machine_->resume());
  return status_reply(machine_->status());
}

Machine::SerialOutput Vmm::serial_output() {
  return [this](int port, uint8_t byte) {
    if (serial_sockets_[port]) serial_sockets_[port]->output(byte);
    std::lock_guard lock(serial_mutex_);
    std::string& text = serial_text_[port];
    text.push_back(static_cast<char>(byte));
    if (text.size() > 2 * kSerialHistoryBytes) text.erase(0, text.size() - kSerialHistoryBytes);
  };
}

void Vmm::connect_serial_input() {
  for (int port = 0; port < 2; ++port) {
    if (!serial_sockets_[port]) continue;
    serial_sockets_[port]->set_input([machine = machine_.get(), port](std::span<const uint8_t> bytes) {
      return machine->serial_input(port, bytes);
    });
  }
}

Result<Reply> Vmm::handle(const BootMicroRequest& request) {
  DELTAVM_TRY(require_no_machine());
  DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path program_path, readable(request.program, "program"));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> program, read_file(program_path, kMaxProgramBytes));
  MicroGuestParameters parameters;
  parameters.work_address = kMicroWorkAddress;
  parameters.work_bytes = request.work_bytes.value_or(
      request.memory_bytes > kMicroWorkAddress ? request.memory_bytes - kMicroWorkAddress : 0);
  parameters.passes = request.passes;
  parameters.seed = request.seed;
  parameters.heartbeat_bytes = request.heartbeat_bytes;
  MachineOptions options;
  options.log_dirty = request.start.log_dirty;
  DELTAVM_ASSIGN_OR_RETURN(GuestMemory memory, boot_memory(request.ram_file, request.memory_bytes));
  DELTAVM_ASSIGN_OR_RETURN(machine_, Machine::boot_micro(system_, std::move(memory), program, parameters, options));
  DELTAVM_ASSIGN_OR_RETURN(StatusReply reply, start(request.start));
  return Reply(std::move(reply));
}

Result<Reply> Vmm::handle(const BootLinuxRequest& request) {
  DELTAVM_TRY(require_no_machine());
  DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path kernel_path, readable(request.kernel, "kernel"));
  DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path initrd_path, readable(request.initrd, "initrd"));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> kernel, read_file(kernel_path, kMaxKernelBytes));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> initrd, read_file(initrd_path, kMaxInitrdBytes));
  MachineOptions options;
  options.log_dirty = request.start.log_dirty;
  DELTAVM_ASSIGN_OR_RETURN(GuestMemory memory, boot_memory(request.ram_file, request.memory_bytes));
  DELTAVM_ASSIGN_OR_RETURN(
      machine_, Machine::boot_linux(system_, std::move(memory), kernel, initrd, request.command_line, request.vcpus,
                                    serial_output(), options));
  connect_serial_input();
  DELTAVM_ASSIGN_OR_RETURN(StatusReply reply, start(request.start));
  return Reply(std::move(reply));
}

Result<Reply> Vmm::handle(const RestoreRequest& request) {
  Clock::time_point received = Clock::now();
  DELTAVM_TRY(require_no_machine());
  DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path state_path, readable(request.state, "state"));
  DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path base_path, readable(request.base, "base"));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> state_bytes, read_file(state_path, kMaxStateBytes));
  DELTAVM_ASSIGN_OR_RETURN(MachineState state, decode_machine_state(state_bytes, state_path.string()));
  RamOverlay overlay;
  if (request.overlay) {
    DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path overlay_path, readable(*request.overlay, "overlay"));
    DELTAVM_ASSIGN_OR_RETURN(overlay, RamOverlay::open(overlay_path, page_count(state.memory_bytes)));
  }
  if (request.strategy == MemoryStrategy::kUserfault && !userfault_.valid()) {
    return make_error(ErrorCode::kUnsupported, "userfault memory: no userfaultfd ({})",
                      userfault_error_.empty() ? "a restore took it" : userfault_error_);
  }
  DELTAVM_ASSIGN_OR_RETURN(GuestMemory memory, GuestMemory::load(request.strategy, base_path, std::move(overlay),
                                                                 state.memory_bytes, std::move(userfault_)));
  Clock::time_point memory_ready = Clock::now();
  MachineOptions options;
  options.log_dirty = request.start.log_dirty;
  RestoreProbe probe(received, request.step_first_instruction);
  probe.attach(options);
  DELTAVM_ASSIGN_OR_RETURN(machine_, Machine::restore(system_, std::move(memory), state, options, serial_output()));
  connect_serial_input();
  Clock::time_point restored = Clock::now();
  DELTAVM_TRY(probe.arm(*machine_));
  DELTAVM_ASSIGN_OR_RETURN(StatusReply reply, start(request.start));
  if (request.wait_first_report) probe.wait_first_report(*machine_, std::chrono::seconds(30));
  reply.timings =
      RestoreTimings{microseconds_between(received, memory_ready), microseconds_between(memory_ready, restored),
                     probe.first_instruction_us(), probe.first_report_us()};
  return Reply(std::move(reply));
}

Result<Reply> Vmm::handle(const StatusRequest&) {
  DELTAVM_TRY(require_machine());
  return Reply(status_reply(machine_->status()));
}

Result<Reply> Vmm::handle(const PauseRequest&) {
  DELTAVM_TRY(require_machine());
  DELTAVM_TRY(machine_->pause());
  return Reply(status_reply(machine_->status()));
}

Result<Reply> Vmm::handle(const ResumeRequest& request) {
  DELTAVM_TRY(require_machine());
  StartOptions start_options;
  start_options.pause_at_checkpoint = request.pause_at_checkpoint;
  DELTAVM_ASSIGN_OR_RETURN(StatusReply reply, start(start_options));
  return Reply(std::move(reply));
}

Result<Reply> Vmm::handle(const WaitRequest& request) {
  DELTAVM_TRY(require_machine());
  return Reply(status_reply(machine_->wait(std::chrono::milliseconds(request.timeout_ms))));
}

Result<Reply> Vmm::handle(const SaveRequest& request) {
  DELTAVM_TRY(require_machine());
  if (machine_->status().state == RunState::kRunning) {
    return make_error(ErrorCode::kInvalidArgument, "the machine is running; pause it before saving");
  }
  // The files are the host's to take at once (it stores what it keeps): written, not fsync'ed.
  SaveReply reply;
  if (request.state) {
    DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path path, writable(*request.state, "state"));
    DELTAVM_ASSIGN_OR_RETURN(MachineState state, machine_->save_state());
    std::vector<uint8_t> bytes = encode_machine_state(state);
    DELTAVM_TRY(write_scratch_file(path, bytes));
    reply.state_bytes = bytes.size();
  }
  if (request.dirty) {
    DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path path, writable(*request.dirty, "dirty"));
    DELTAVM_ASSIGN_OR_RETURN(std::vector<uint64_t> log, machine_->take_dirty_log());
    uint64_t pages = page_count(machine_->memory().size());
    uint64_t dirty = 0;
    for (uint64_t word : log) dirty += static_cast<uint64_t>(__builtin_popcountll(word));
    std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(log.data()), (pages + 7) / 8);
    DELTAVM_TRY(write_scratch_file(path, bytes));
    reply.dirty_pages = dirty;
  }
  if (request.ram) {
    DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path path, writable(*request.ram, "ram"));
    DELTAVM_TRY(write_scratch_file(path, machine_->memory()));
  }
  if (request.changes) {
    DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path path, writable(*request.changes, "changes"));
    DELTAVM_ASSIGN_OR_RETURN(std::vector<uint64_t> log, machine_->dirty_since_start());
    std::span<const uint8_t> memory = machine_->memory();
    uint64_t pages = page_count(memory.size());
    const auto* bitmap = reinterpret_cast<const uint8_t*>(log.data());
    std::vector<uint8_t> bytes(bitmap, bitmap + (pages + 7) / 8);
    uint64_t changed = 0;
    for (uint64_t page = 0; page < pages; ++page) {
      if (((log[page / 64] >> (page % 64)) & 1) == 0) continue;
      bytes.insert(bytes.end(), memory.begin() + static_cast<ptrdiff_t>(page * kPageSize),
                   memory.begin() + static_cast<ptrdiff_t>((page + 1) * kPageSize));
      ++changed;
    }
    DELTAVM_TRY(write_scratch_file(path, bytes));
    reply.changed_pages = changed;
  }
  if (request.digest) {
    auto [high, low] = machine_->guest_memory().digest();
    reply.ram_digest = fmt::format("{:016x}{:016x}", high, low);
  }
  return Reply(reply);
}

Result<Reply> Vmm::handle(const SerialOutputRequest& request) {
  std::lock_guard lock(serial_mutex_);
  const std::string& text = serial_text_[request.port];
  size_t start = text.size() > kSerialHistoryBytes ? text.size() - kSerialHistoryBytes : 0;
  return Reply(SerialOutputReply{text.substr(start)});
}

Result<Reply> Vmm::handle(const FloorRequest&) {
  DELTAVM_ASSIGN_OR_RETURN(double floor_us, measure_floor(system_));
  return Reply(FloorReply{floor_us});
}

Result<Reply> Vmm::handle(const QuitRequest&) { return Reply(QuitReply{}); }

}  // namespace deltavm::vmm
