#include "backends/qemu/qemu_backend.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <thread>

#include "backends/process.h"
#include "backends/qemu/qmp.h"
#include "base/file.h"

namespace deltavm {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kLaunchTimeout = std::chrono::seconds(30);
constexpr auto kMigrationTimeout = std::chrono::seconds(60);

double elapsed_ms(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

std::string qemu_binary() {
  const char* binary = std::getenv("DELTAVM_QEMU");
  return binary != nullptr && *binary ? binary : "qemu-system-x86_64";
}


// QEMU's command line for `machine`. RAM is `ram_file` (shared or private), or anonymous
// memory when `ram_file` is empty.
std::vector<std::string> machine_arguments(const MachineSpec& machine, const std::filesystem::path& ram_file,
                                           bool shared, const VmDirectory& vm) {
  Accelerator accelerator = choose_accelerator();
  uint64_t memory_mib = machine.memory_bytes >> 20;
  std::vector<std::string> argv = {
      qemu_binary(), "-accel", accelerator.name, "-cpu", accelerator.name == "kvm" ? "host" : "max",
      "-m", fmt::format("{}M", memory_mib), "-smp", std::to_string(machine.vcpus),
      "-nodefaults", "-display", "none", "-no-user-config", "-no-reboot",
      "-object", ram_file.empty() ? fmt::format("memory-backend-ram,id=ram,size={}M", memory_mib)
                                  : fmt::format("memory-backend-file,id=ram,size={}M,mem-path={},share={}",
                                                memory_mib, ram_file.string(), shared ? "on" : "off"),
      "-machine", "pc,memory-backend=ram",
      "-kernel", machine.kernel.string(), "-initrd", machine.initramfs.string(),
      "-append", machine.command_line,
      "-chardev", fmt::format("socket,id=console,path={},server=on,wait=off", vm.console_socket().string()),
      "-serial", "chardev:console",
      "-chardev", fmt::format("socket,id=agent,path={},server=on,wait=off", vm.agent_socket().string()),
      "-serial", "chardev:agent",
      "-qmp", fmt::format("unix:{},server=on,wait=off", vm.control_socket().string())};
  if (machine.deterministic) {
    argv.insert(argv.end(), {"-rtc", "base=2024-01-01T00:00:00,clock=vm"});
  }
  return argv;
}

Status record_process(const VmDirectory& vm, int pid, const std::filesystem::path& ram_file) {
  Result<nlohmann::json> existing = vm.read_record();
  nlohmann::json record = existing ? *existing : nlohmann::json::object();
  record["id"] = vm.id();
  record["backend"] = "qemu";
  record["pid"] = pid;
  record["ram_file"] = ram_file.string();
  return vm.write_record(record);
}

// Connects to QMP of a QEMU just started; if it dies first, the error carries its log.
Result<QmpClient> connect_to_new_qemu(const VmDirectory& vm, int pid) {
  Deadline deadline = deadline_after(kLaunchTimeout);
  for (;;) {
    Result<QmpClient> client = QmpClient::connect(vm.control_socket(), std::min(deadline, deadline_after(std::chrono::milliseconds(50))));
    if (client) return client;
    if (::kill(pid, 0) != 0) {
      return make_error(ErrorCode::kIo, "qemu exited at start: {}", tail_of_log(vm.log_file()));
    }
    if (Clock::now() >= deadline) return client.error();
  }
}

// x-ignore-shared leaves RAM backed by a file out of the migration stream.
Status set_ignore_shared(QmpClient& qmp, bool on) {
  DELTAVM_TRY(qmp.execute("migrate-set-capabilities",
                          {{"capabilities", {{{"capability", "x-ignore-shared"}, {"state", on}}}}}));
  return {};
}

// Writes guest pages straight into QEMU's private mapping of the base RAM file with
// process_vm_writev: the kernel copies each page on write, so the file stays untouched.
class ProcessMemoryWriter : public GuestMemoryWriter {
 public:
  ProcessMemoryWriter(int pid, uint64_t ram_address, uint64_t ram_bytes)
      : pid_(pid), ram_address_(ram_address), ram_bytes_(ram_bytes) {}

  Status write_pages(std::span<const PageWrite> pages) override {
    constexpr size_t kBatch = 512;  // Well under IOV_MAX.
    std::vector<iovec> local(kBatch), remote(kBatch);
    for (size_t first = 0; first < pages.size(); first += kBatch) {
      size_t count = std::min(kBatch, pages.size() - first);
      for (size_t i = 0; i < count; ++i) {
        const PageWrite& page = pages[first + i];
        if (page.guest_physical_address + 4096 > ram_bytes_) {
          return make_error(ErrorCode::kInvalidArgument, "page at {:#x} is outside the guest's {} bytes of RAM",
                            page.guest_physical_address, ram_bytes_);
        }
        local[i] = {const_cast<uint8_t*>(page.bytes), 4096};
        remote[i] = {reinterpret_cast<void*>(ram_address_ + page.guest_physical_address), 4096};
      }
      ssize_t written = ::process_vm_writev(pid_, local.data(), count, remote.data(), count, 0);
      if (written < 0) return errno_error(fmt::format("process_vm_writev into qemu {}", pid_), errno);
      if (static_cast<size_t>(written) != count * 4096) {
        return make_error(ErrorCode::kIo, "process_vm_writev into qemu {}: wrote {} of {} bytes", pid_, written,
                          count * 4096);
      }
    }
    return {};
  }

 private:
  int pid_;
  uint64_t ram_address_;
  uint64_t ram_bytes_;
};

// Where QEMU mapped `ram_file`: the start of the mapping in /proc/PID/maps whose device and
// inode are the file's.
Result<uint64_t> find_ram_mapping(int pid, const std::filesystem::path& ram_file, uint64_t ram_bytes) {
  struct stat st {};
  if (::stat(ram_file.c_str(), &st) != 0) return errno_error(fmt::format("stat {}", ram_file.string()), errno);
  std::ifstream maps(fmt::format("/proc/{}/maps", pid));
  std::string line;
  while (std::getline(maps, line)) {
    unsigned long long start = 0, end = 0, offset = 0, inode = 0;
    unsigned major = 0, minor = 0;
    char permissions[8] = {};
    if (std::sscanf(line.c_str(), "%llx-%llx %7s %llx %x:%x %llu", &start, &end, permissions, &offset, &major,
                    &minor, &inode) != 7) {
      continue;
    }
    // QEMU may map the file before making it writable; only the final read-write mapping counts.
    bool writable = permissions[0] == 'r' && permissions[1] == 'w';
    if (inode == st.st_ino && makedev(major, minor) == st.st_dev && offset == 0 && end - start >= ram_bytes &&
        writable) {
      return static_cast<uint64_t>(start);
    }
  }
  return make_error(ErrorCode::kIo, "qemu {} has no mapping of {} ({} bytes)", pid, ram_file.string(), ram_bytes);
}

// find_ram_mapping, retried until QEMU has created the mapping or has exited.
Result<uint64_t> wait_for_ram_mapping(int pid, const std::filesystem::path& ram_file, uint64_t ram_bytes) {
  Deadline deadline = deadline_after(kLaunchTimeout);
  for (;;) {
    Result<uint64_t> address = find_ram_mapping(pid, ram_file, ram_bytes);
    if (address || ::kill(pid, 0) != 0 || Clock::now() >= deadline) return address;
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
}

class QemuBackend : public Backend {
 public:
  std::string name() const override { return "qemu"; }

  std::string describe() const override {
    Accelerator accelerator = choose_accelerator();
    return fmt::format("{} with {}: {}", qemu_binary(), accelerator.name, accelerator.reason);
  }

  Status boot(const MachineSpec& machine, const std::filesystem::path& ram_file, const VmDirectory& vm) override {
    {
      DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(ram_file, O_RDWR | O_CREAT | O_TRUNC, 0600));
      if (::ftruncate(fd.get(), static_cast<off_t>(machine.memory_bytes)) != 0) {
        return errno_error(fmt::format("truncate {}", ram_file.string()), errno);
      }
    }
    DELTAVM_ASSIGN_OR_RETURN(int pid, spawn_detached(machine_arguments(machine, ram_file, true, vm), vm.log_file()));
    DELTAVM_TRY(record_process(vm, pid, ram_file));
    DELTAVM_ASSIGN_OR_RETURN(QmpClient qmp, connect_to_new_qemu(vm, pid));
    return {};
  }

  Status pause(const VmDirectory& vm) override {
    DELTAVM_ASSIGN_OR_RETURN(QmpClient qmp, QmpClient::connect(vm.control_socket(), deadline_after(kLaunchTimeout)));
    DELTAVM_TRY(qmp.execute("stop"));
    return {};
  }

  Result<std::vector<uint8_t>> save_machine_state(const VmDirectory& vm) override {
    DELTAVM_ASSIGN_OR_RETURN(QmpClient qmp, QmpClient::connect(vm.control_socket(), deadline_after(kLaunchTimeout)));
    DELTAVM_ASSIGN_OR_RETURN(nlohmann::json status, qmp.execute("query-status"));
    if (status.value("running", true)) {
      return make_error(ErrorCode::kInvalidArgument, "VM {} is running; pause it before saving its state", vm.id());
    }
    std::filesystem::path state = vm.path() / "state.out";
    DELTAVM_TRY(set_ignore_shared(qmp, true));
    DELTAVM_TRY(qmp.execute("migrate", {{"uri", fmt::format("exec:cat > {}", state.string())}}));
    DELTAVM_TRY(qmp.wait_for_migration(kMigrationTimeout));
    DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, read_file(state));
    std::filesystem::remove(state);
    return bytes;
  }

  Result<RestoreTimings> restore(const MachineSpec& machine, const std::filesystem::path& base_ram_file,
                                 const FillMemory& fill, std::span<const uint8_t> machine_state,
                                 const VmDirectory& vm, bool leave_paused) override {
    RestoreTimings timings;
    auto start = Clock::now();
    // The state goes to a scratch file QEMU reads with cat (nothing to keep across a crash,
    // so no fsync).
    std::filesystem::path state = vm.path() / "state.in";
    {
      DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(state, O_WRONLY | O_CREAT | O_TRUNC, 0600));
      DELTAVM_TRY(write_all(fd.get(), machine_state, state));
    }
    std::vector<std::string> argv = machine_arguments(machine, base_ram_file, false, vm);
    argv.insert(argv.end(), {"-incoming", "defer"});
    DELTAVM_ASSIGN_OR_RETURN(int pid, spawn_detached(argv, vm.log_file()));
    DELTAVM_TRY(record_process(vm, pid, base_ram_file));
    // QEMU maps guest RAM early in its start-up and answers QMP much later: the chain's pages
    // are written on this thread's twin core meanwhile.
    Status fill_status;
    std::thread filler([&] {
      auto fill_start = Clock::now();
      Result<uint64_t> ram_address = wait_for_ram_mapping(pid, base_ram_file, machine.memory_bytes);
      if (!ram_address) {
        fill_status = ram_address.error();
        return;
      }
      ProcessMemoryWriter writer(pid, *ram_address, machine.memory_bytes);
      fill_status = fill(writer);
      timings.fill_ms = elapsed_ms(fill_start);
    });
    Result<QmpClient> connected = connect_to_new_qemu(vm, pid);
    filler.join();
    if (!connected) return connected.error();
    QmpClient& qmp = *connected;
    timings.launch_ms = elapsed_ms(start);
    DELTAVM_TRY(fill_status);

    auto state_start = Clock::now();
    DELTAVM_TRY(set_ignore_shared(qmp, true));
    DELTAVM_TRY(qmp.execute("migrate-incoming", {{"uri", fmt::format("exec:cat {}", state.string())}}));
    DELTAVM_TRY(qmp.wait_for_migration(kMigrationTimeout));
    if (!leave_paused) DELTAVM_TRY(qmp.execute("cont"));
    timings.state_ms = elapsed_ms(state_start);
    std::filesystem::remove(state);
    return timings;
  }

  Status resume(const VmDirectory& vm) override {
    DELTAVM_ASSIGN_OR_RETURN(QmpClient qmp, QmpClient::connect(vm.control_socket(), deadline_after(kLaunchTimeout)));
    DELTAVM_TRY(qmp.execute("cont"));
    return {};
  }

  Status read_memory(const VmDirectory& vm, std::span<uint8_t> out) override {
    Result<nlohmann::json> record = vm.read_record();
    if (!record || !record->contains("ram_file")) {
      return make_error(ErrorCode::kNotFound, "VM {}: no RAM file recorded", vm.id());
    }
    int pid = vm.pid();
    std::filesystem::path ram_file = (*record)["ram_file"].get<std::string>();
    DELTAVM_ASSIGN_OR_RETURN(uint64_t ram_address, find_ram_mapping(pid, ram_file, out.size()));
    constexpr size_t kChunk = 1 << 20;
    for (size_t offset = 0; offset < out.size(); offset += kChunk) {
      size_t length = std::min(kChunk, out.size() - offset);
      iovec local{out.data() + offset, length};
      iovec remote{reinterpret_cast<void*>(ram_address + offset), length};
      ssize_t n = ::process_vm_readv(pid, &local, 1, &remote, 1, 0);
      if (n != static_cast<ssize_t>(length)) {
        return errno_error(fmt::format("process_vm_readv from qemu {}", pid), n < 0 ? errno : EIO);
      }
    }
    return {};
  }

  Status stop(const VmDirectory& vm) override {
    int pid = vm.pid();
    if (pid <= 0 || ::kill(pid, 0) != 0) return {};
    Result<QmpClient> qmp = QmpClient::connect(vm.control_socket(), deadline_after(std::chrono::seconds(2)));
    if (qmp) (void)qmp->execute("quit", nullptr, std::chrono::seconds(2));
    auto deadline = Clock::now() + std::chrono::seconds(5);
    while (::kill(pid, 0) == 0 && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    if (::kill(pid, 0) == 0) ::kill(pid, SIGKILL);
    return {};
  }
};

}  // namespace

Status save_stock_snapshot(const VmDirectory& vm, const std::filesystem::path& stream) {
  DELTAVM_ASSIGN_OR_RETURN(QmpClient qmp, QmpClient::connect(vm.control_socket(), deadline_after(kLaunchTimeout)));
  DELTAVM_TRY(qmp.execute("stop"));
  DELTAVM_TRY(set_ignore_shared(qmp, false));
  DELTAVM_TRY(qmp.execute("migrate", {{"uri", fmt::format("exec:cat > {}", stream.string())}}));
  return qmp.wait_for_migration(kMigrationTimeout);
}

Result<RestoreTimings> restore_stock_snapshot(const MachineSpec& machine, const std::filesystem::path& stream,
                                              const VmDirectory& vm) {
  RestoreTimings timings;
  auto start = Clock::now();
  std::vector<std::string> argv = machine_arguments(machine, {}, false, vm);
  argv.insert(argv.end(), {"-incoming", "defer"});
  DELTAVM_ASSIGN_OR_RETURN(int pid, spawn_detached(argv, vm.log_file()));
  DELTAVM_TRY(record_process(vm, pid, {}));
  DELTAVM_ASSIGN_OR_RETURN(QmpClient qmp, connect_to_new_qemu(vm, pid));
  timings.launch_ms = elapsed_ms(start);
  auto state_start = Clock::now();
  DELTAVM_TRY(qmp.execute("migrate-incoming", {{"uri", fmt::format("exec:cat {}", stream.string())}}));
  DELTAVM_TRY(qmp.wait_for_migration(kMigrationTimeout));
  DELTAVM_TRY(qmp.execute("cont"));
  timings.state_ms = elapsed_ms(state_start);
  return timings;
}

Accelerator choose_accelerator() {
  if (const char* forced = std::getenv("DELTAVM_QEMU_ACCEL"); forced != nullptr && *forced) {
    return {forced, "set by DELTAVM_QEMU_ACCEL"};
  }
  bool device = ::access("/dev/kvm", R_OK | W_OK) == 0;
  if (std::filesystem::exists("/sys/module/kvm_pvm")) {
    return {"tcg", fmt::format("KVM here is software nested virtualisation (module kvm_pvm{}): ring-0 guest code "
                               "would be emulated about 1000x slower than TCG runs it",
                               device ? "" : "; /dev/kvm is absent too")};
  }
  if (!device) return {"tcg", "/dev/kvm is not available"};
  return {"kvm", "/dev/kvm is hardware-backed"};
}

std::unique_ptr<Backend> make_qemu_backend() { return std::make_unique<QemuBackend>(); }


}  // namespace deltavm
