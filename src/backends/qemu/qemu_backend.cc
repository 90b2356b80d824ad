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

#include <sys/mman.h>

#include "backends/jail.h"
#include "backends/process.h"
#include "backends/qemu/migration_stream.h"
#include "backends/qemu/qmp.h"
#include "backends/vm_processes.h"
#include "base/file.h"
#include "base/page.h"
#include "base/pagemap.h"
#include "base/subprocess.h"

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

// QEMU parses -object, -chardev and -mon values as comma-separated options, where a comma
// inside a value is written twice. Paths reach QEMU only through argv (never a shell), so no
// other character needs quoting; control characters are refused, since QEMU's error messages
// and logs would carry them.
Result<std::string> option_value(const std::filesystem::path& path, std::string_view what) {
  std::string text = path.string();
  for (char c : text) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      return make_error(ErrorCode::kInvalidArgument, "{} {:?} has a control character, which QEMU cannot take", what,
                        text);
    }
  }
  std::string quoted;
  for (char c : text) quoted += c == ',' ? std::string(",,") : std::string(1, c);
  return quoted;
}

// The fd number at which a restoring QEMU finds the machine state (migrate-incoming fd:3).
constexpr int kIncomingStateFd = 3;

// QEMU's command line for `machine`. RAM is `ram_file` (shared or private), or anonymous
// memory when `ram_file` is empty.
Result<std::vector<std::string>> machine_arguments(const MachineSpec& machine, const std::filesystem::path& ram_file,
                                                   bool shared, const VmDirectory& vm) {
  Accelerator accelerator = choose_accelerator();
  uint64_t memory_mib = machine.memory_bytes >> 20;
  std::string memory_object = fmt::format("memory-backend-ram,id=ram,size={}M", memory_mib);
  if (!ram_file.empty()) {
    DELTAVM_ASSIGN_OR_RETURN(std::string mem_path, option_value(ram_file, "RAM file"));
    memory_object = fmt::format("memory-backend-file,id=ram,size={}M,mem-path={},share={}", memory_mib, mem_path,
                                shared ? "on" : "off");
  }
  DELTAVM_ASSIGN_OR_RETURN(std::string console, option_value(vm.console_socket(), "console socket"));
  DELTAVM_ASSIGN_OR_RETURN(std::string console_log, option_value(vm.console_log(), "console log"));
  DELTAVM_ASSIGN_OR_RETURN(std::string agent, option_value(vm.agent_socket(), "agent socket"));
  DELTAVM_ASSIGN_OR_RETURN(std::string control, option_value(vm.control_socket(), "control socket"));
  // -kernel, -initrd and -append take their argument whole; only control characters are refused.
  for (const auto& [path, what] : {std::pair{&machine.kernel, "kernel"}, {&machine.initramfs, "initramfs"}}) {
    if (Result<std::string> checked = option_value(*path, what); !checked) return checked.error();
  }
  std::vector<std::string> argv = {
      qemu_binary(),
      "-accel",
      accelerator.name,
      "-cpu",
      accelerator.name == "kvm" ? "host" : "max",
      "-m",
      fmt::format("{}M", memory_mib),
      "-smp",
      std::to_string(machine.vcpus),
      "-nodefaults",
      "-display",
      "none",
      "-no-user-config",
      "-no-reboot",
      "-object",
      memory_object,
      "-machine",
      "pc,memory-backend=ram",
      "-kernel",
      machine.kernel.string(),
      "-initrd",
      machine.initramfs.string(),
      "-append",
      machine.command_line,
      "-chardev",
      fmt::format("socket,id=console,path={},server=on,wait=off,logfile={},logappend=on", console, console_log),
      "-serial",
      "chardev:console",
      "-chardev",
      fmt::format("socket,id=agent,path={},server=on,wait=off", agent),
      "-serial",
      "chardev:agent",
      "-chardev",
      fmt::format("socket,id=qmp,path={},server=on,wait=off", control),
      "-mon",
      "chardev=qmp,mode=control"};
  if (machine.deterministic) {
    argv.insert(argv.end(), {"-rtc", "base=2024-01-01T00:00:00,clock=vm"});
  }
  return argv;
}

// An anonymous in-memory file (memfd) holding `bytes`, read from its start.
Result<Fd> memory_file(std::span<const uint8_t> bytes, const char* name) {
  Fd fd(::memfd_create(name, MFD_CLOEXEC));
  if (!fd.valid()) return errno_error("memfd_create", errno);
  DELTAVM_TRY(write_all(fd.get(), bytes, name));
  if (::lseek(fd.get(), 0, SEEK_SET) != 0) return errno_error("lseek memfd", errno);
  return fd;
}

// QEMU's machine state is a few hundred KiB without RAM; a stream larger than this is not one.
constexpr uint64_t kMaxMachineStateBytes = 64ull << 20;

// The bytes of `fd` from its start, refusing more than `limit`.
Result<std::vector<uint8_t>> read_back(int fd, uint64_t limit, std::string_view what) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return errno_error(fmt::format("stat {}", what), errno);
  if (static_cast<uint64_t>(st.st_size) > limit) {
    return make_error(ErrorCode::kIo, "{}: {} bytes, more than the {} allowed", what, st.st_size, limit);
  }
  std::vector<uint8_t> bytes(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::pread(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return errno_error(fmt::format("read {}", what), n < 0 ? errno : EIO);
    done += static_cast<size_t>(n);
  }
  return bytes;
}

// x-ignore-shared leaves RAM backed by a file out of the migration stream.
Status set_ignore_shared(QmpClient& qmp, bool on) {
  DELTAVM_TRY(qmp.execute("migrate-set-capabilities",
                          {{"capabilities", {{{"capability", "x-ignore-shared"}, {"state", on}}}}}));
  return {};
}

Status require_paused(QmpClient& qmp, const VmDirectory& vm) {
  DELTAVM_ASSIGN_OR_RETURN(nlohmann::json status, qmp.execute("query-status"));
  if (!status.is_object() || !status.contains("running") || !status["running"].is_boolean() ||
      status["running"].get<bool>()) {
    return make_error(ErrorCode::kInvalidArgument, "VM {} is running; pause it before saving its state", vm.id());
  }
  return {};
}

// QEMU's default migration bandwidth (32 MiB/s) would make saving a clone's state, RAM pages
// included, take seconds; it goes to a file in memory, as fast as QEMU writes.
Status set_unlimited_bandwidth(QmpClient& qmp) {
  DELTAVM_TRY(qmp.execute("migrate-set-parameters", {{"max-bandwidth", int64_t{1} << 40}}));
  return {};
}

// Migrates the paused VM's state into `fd` (a file deltavm opened: QEMU gets the fd over QMP,
// never a path or a shell command).
Status migrate_to_fd(QmpClient& qmp, int fd) {
  DELTAVM_TRY(qmp.send_fd("deltavm-state", fd));
  DELTAVM_TRY(qmp.execute("migrate", {{"uri", "fd:deltavm-state"}}));
  return qmp.wait_for_migration(kMigrationTimeout);
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
        if (page.guest_physical_address + kPageSize > ram_bytes_) {
          return make_error(ErrorCode::kInvalidArgument, "page at {:#x} is outside the guest's {} bytes of RAM",
                            page.guest_physical_address, ram_bytes_);
        }
        local[i] = {const_cast<uint8_t*>(page.bytes), kPageSize};
        // An address in QEMU's address space, never dereferenced here.
        remote[i] = {
            reinterpret_cast<void*>(ram_address_ + page.guest_physical_address),  // NOLINT(performance-no-int-to-ptr)
            kPageSize};
      }
      ssize_t written = ::process_vm_writev(pid_, local.data(), count, remote.data(), count, 0);
      if (written < 0) return errno_error(fmt::format("process_vm_writev into qemu {}", pid_), errno);
      if (static_cast<size_t>(written) != count * kPageSize) {
        return make_error(ErrorCode::kIo, "process_vm_writev into qemu {}: wrote {} of {} bytes", pid_, written,
                          count * kPageSize);
      }
    }
    return {};
  }

 private:
  int pid_;
  uint64_t ram_address_;
  uint64_t ram_bytes_;
};

// Copies pages `pages` (indexes, ascending) of the guest RAM QEMU `pid` maps at `ram_address`
// into the same places of `ram`, a contiguous run of pages per transfer.
Status read_guest_pages(int pid, uint64_t ram_address, std::span<const uint64_t> pages, std::span<uint8_t> ram) {
  constexpr size_t kBatch = 512;
  std::vector<iovec> local, remote;
  auto flush = [&]() -> Status {
    if (local.empty()) return {};
    size_t want = 0;
    for (const iovec& v : local) want += v.iov_len;
    ssize_t n = ::process_vm_readv(pid, local.data(), local.size(), remote.data(), remote.size(), 0);
    if (n != static_cast<ssize_t>(want)) {
      return errno_error(fmt::format("process_vm_readv from qemu {}", pid), n < 0 ? errno : EIO);
    }
    local.clear();
    remote.clear();
    return {};
  };
  for (size_t i = 0; i < pages.size();) {
    size_t run = 1;
    while (i + run < pages.size() && pages[i + run] == pages[i] + run) ++run;
    uint64_t offset = pages[i] * kPageSize;
    if (offset + run * kPageSize > ram.size()) {
      return make_error(ErrorCode::kInvalidArgument, "page {:#x} is outside the guest's {} bytes of RAM", offset,
                        ram.size());
    }
    local.push_back({ram.data() + offset, run * kPageSize});
    remote.push_back(
        {reinterpret_cast<void*>(ram_address + offset), run * kPageSize});  // NOLINT(performance-no-int-to-ptr)
    if (local.size() == kBatch) DELTAVM_TRY(flush());
    i += run;
  }
  return flush();
}

// For tests: drops the last `count` of `pages` whose bytes differ from `ram`'s, as a capture
// method that missed them would.
Status omit_changed_pages(int pid, uint64_t ram_address, uint64_t count, std::vector<uint64_t>& pages,
                          std::span<const uint8_t> ram) {
  std::vector<uint8_t> page(kPageSize);
  for (size_t i = pages.size(); i > 0 && count > 0; --i) {
    uint64_t index = pages[i - 1];
    iovec local{page.data(), kPageSize};
    // An address in QEMU's address space, never dereferenced here.
    void* address = reinterpret_cast<void*>(ram_address + index * kPageSize);  // NOLINT(performance-no-int-to-ptr)
    iovec remote{address, kPageSize};
    if (::process_vm_readv(pid, &local, 1, &remote, 1, 0) != static_cast<ssize_t>(kPageSize)) {
      return errno_error(fmt::format("process_vm_readv from qemu {}", pid), errno);
    }
    if (!std::equal(page.begin(), page.end(), ram.begin() + static_cast<ptrdiff_t>(index * kPageSize))) {
      pages.erase(pages.begin() + static_cast<ptrdiff_t>(i - 1));
      --count;
    }
  }
  return {};
}

// The name QEMU gives the guest RAM block (the memory backend's id in machine_arguments).
constexpr std::string_view kRamBlock = "ram";

// Strips the guest RAM's pages out of a clone's migration stream (qemu/migration_stream.h),
// checking each against `ram`: the machine state, if every page of the guest's RAM is in the
// stream and equal to `ram`'s.
Result<std::vector<uint8_t>> machine_state_witnessed(std::span<const uint8_t> stream, std::span<const uint8_t> ram,
                                                     const std::string& vm_id) {
  uint64_t pages = ram.size() / kPageSize;
  std::vector<bool> seen(pages, false);
  std::vector<uint64_t> differing;
  uint64_t differing_count = 0;
  auto visit = [&](const StreamPage& page) -> Status {
    const uint8_t* expected = ram.data() + page.offset;
    bool equal = page.bytes != nullptr
                     ? std::equal(page.bytes, page.bytes + kPageSize, expected)
                     : std::all_of(expected, expected + kPageSize, [&](uint8_t byte) { return byte == page.fill; });
    uint64_t index = page.offset / kPageSize;
    seen[index] = true;
    if (!equal) {
      ++differing_count;
      if (differing.size() < 4) differing.push_back(page.offset);
    }
    return {};
  };
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> state,
                           strip_ram_pages(stream, kRamBlock, ram.size(), kMaxMachineStateBytes, visit));
  uint64_t missing = static_cast<uint64_t>(std::count(seen.begin(), seen.end(), false));
  if (missing > 0) {
    return make_error(ErrorCode::kCorruption, "VM {}: qemu's migration stream lacks {} of the {} pages of its RAM",
                      vm_id, missing, pages);
  }
  if (differing_count > 0) {
    return make_error(ErrorCode::kCorruption,
                      "VM {}: the capture differs from the VM's RAM in {} pages (first at {:#x}): a changed page was "
                      "missed, so the snapshot is refused",
                      vm_id, differing_count, fmt::join(differing, ", "));
  }
  return state;
}

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
    if (std::sscanf(line.c_str(), "%llx-%llx %7s %llx %x:%x %llu", &start, &end, permissions, &offset, &major, &minor,
                    &inode) != 7) {
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
Result<uint64_t> wait_for_ram_mapping(const ProcessIdentity& qemu, const std::filesystem::path& ram_file,
                                      uint64_t ram_bytes) {
  Deadline deadline = deadline_after(kLaunchTimeout);
  for (;;) {
    Result<uint64_t> address = find_ram_mapping(qemu.pid, ram_file, ram_bytes);
    if (address || !process_running(qemu) || Clock::now() >= deadline) return address;
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
}

// What a QEMU holds besides its guest's RAM: TCG's translated code and QEMU's own heap.
constexpr uint64_t kQemuOverheadBytes = 1ull << 30;

// Jails a QEMU about to start for `vm` running `machine` (backends/jail.h) when `policy` says
// so. QEMU opens what it needs as root (the RAM file, the kernel, its sockets), then, before
// the guest runs, chroots into an empty directory, becomes the jail uid and installs its
// seccomp filter (-sandbox; set*id stays allowed for -runas, and a process without
// capabilities gains nothing from it). The jail holds the uid and the cgroups until the launch
// is done.
Result<std::optional<Jail>> jail_qemu(const Result<JailPolicy>& policy, const VmDirectory& vm,
                                      const MachineSpec& machine, SpawnOptions& options) {
  if (!policy) return policy.error();
  if (!policy->enabled) return std::optional<Jail>();
  DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path root, jail_root(vm.runtime()));
  // -chroot takes its argument whole; only control characters are refused.
  if (Result<std::string> checked = option_value(root, "jail root"); !checked) return checked.error();
  ResourceLimits limits = vm_process_limits(machine.memory_bytes, machine.vcpus, kQemuOverheadBytes);
  DELTAVM_ASSIGN_OR_RETURN(Jail jail, prepare_jail(vm.runtime(), *policy, vm.id(), limits, options));
  options.argv.insert(options.argv.end(),
                      {"-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
                       "-chroot", root.string(), "-runas", fmt::format("{}:{}", jail.uid.uid, jail.uid.uid)});
  return std::optional<Jail>(std::move(jail));
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
    SpawnOptions options;
    DELTAVM_ASSIGN_OR_RETURN(options.argv, machine_arguments(machine, ram_file, true, vm));
    options.log = vm.log_file();
    options.umask = kVmProcessUmask;
    // A booting VM exists only for the build that boots it: it dies with its owner.
    options.die_with_parent = true;
    DELTAVM_ASSIGN_OR_RETURN(std::optional<Jail> jail, jail_qemu(jail_policy_, vm, machine, options));
    DELTAVM_TRY(launch(vm, options, ram_file));
    DELTAVM_ASSIGN_OR_RETURN(QmpClient qmp, connect_to_new_qemu(vm));
    return {};
  }

  Status pause(const VmDirectory& vm) override {
    DELTAVM_ASSIGN_OR_RETURN(QmpClient qmp, QmpClient::connect(vm.control_socket(), deadline_after(kLaunchTimeout)));
    DELTAVM_TRY(qmp.execute("stop"));
    return {};
  }

  Result<std::vector<uint8_t>> save_machine_state(const VmDirectory& vm) override {
    DELTAVM_ASSIGN_OR_RETURN(QmpClient qmp, QmpClient::connect(vm.control_socket(), deadline_after(kLaunchTimeout)));
    DELTAVM_TRY(require_paused(qmp, vm));
    Fd state(::memfd_create("deltavm-machine-state", MFD_CLOEXEC));
    if (!state.valid()) return errno_error("memfd_create", errno);
    DELTAVM_TRY(set_ignore_shared(qmp, true));
    DELTAVM_TRY(migrate_to_fd(qmp, state.get()));
    return read_back(state.get(), kMaxMachineStateBytes, fmt::format("VM {} machine state", vm.id()));
  }

  Result<RestoreTimings> restore(const MachineSpec& machine, const std::filesystem::path& base_ram_file,
                                 const FillMemory& fill, std::span<const uint8_t> machine_state, const VmDirectory& vm,
                                 bool leave_paused) override {
    RestoreTimings timings;
    auto start = Clock::now();
    // QEMU reads the state from an in-memory file it inherits as fd 3: no path, no shell.
    DELTAVM_ASSIGN_OR_RETURN(Fd state, memory_file(machine_state, "deltavm-machine-state"));
    SpawnOptions options;
    DELTAVM_ASSIGN_OR_RETURN(options.argv, machine_arguments(machine, base_ram_file, false, vm));
    options.argv.insert(options.argv.end(), {"-incoming", "defer"});
    options.log = vm.log_file();
    options.umask = kVmProcessUmask;
    options.pass_fds = {{state.get(), kIncomingStateFd}};
    DELTAVM_ASSIGN_OR_RETURN(std::optional<Jail> jail, jail_qemu(jail_policy_, vm, machine, options));
    DELTAVM_ASSIGN_OR_RETURN(ProcessIdentity qemu, launch(vm, options, base_ram_file));
    // QEMU maps guest RAM early in its start-up and answers QMP much later: the chain's pages
    // are written on this thread's twin core meanwhile.
    Status fill_status;
    std::thread filler([&] {
      auto fill_start = Clock::now();
      Result<uint64_t> ram_address = wait_for_ram_mapping(qemu, base_ram_file, machine.memory_bytes);
      if (!ram_address) {
        fill_status = ram_address.error();
        return;
      }
      ProcessMemoryWriter writer(qemu.pid, *ram_address, machine.memory_bytes);
      fill_status = fill(writer);
      timings.fill_ms = elapsed_ms(fill_start);
    });
    Result<QmpClient> connected = connect_to_new_qemu(vm);
    filler.join();
    if (!connected) return connected.error();
    QmpClient& qmp = *connected;
    timings.launch_ms = elapsed_ms(start);
    DELTAVM_TRY(fill_status);

    auto state_start = Clock::now();
    DELTAVM_TRY(set_ignore_shared(qmp, true));
    DELTAVM_TRY(qmp.execute("migrate-incoming", {{"uri", fmt::format("fd:{}", kIncomingStateFd)}}));
    DELTAVM_TRY(qmp.wait_for_migration(kMigrationTimeout));
    if (!leave_paused) DELTAVM_TRY(qmp.execute("cont"));
    timings.state_ms = elapsed_ms(state_start);
    return timings;
  }

  Status resume(const VmDirectory& vm) override {
    DELTAVM_ASSIGN_OR_RETURN(QmpClient qmp, QmpClient::connect(vm.control_socket(), deadline_after(kLaunchTimeout)));
    DELTAVM_TRY(qmp.execute("cont"));
    return {};
  }

  Result<std::unique_ptr<HeldControl>> hold_control(const VmDirectory& vm) override {
    // QMP's greeting and capability negotiation are done now; resume() is one `cont`.
    class HeldQmp : public HeldControl {
     public:
      explicit HeldQmp(QmpClient qmp) : qmp_(std::move(qmp)) {}
      Status resume() override { return qmp_.execute("cont").status(); }

     private:
      QmpClient qmp_;
    };
    DELTAVM_ASSIGN_OR_RETURN(QmpClient qmp, QmpClient::connect(vm.control_socket(), deadline_after(kLaunchTimeout)));
    return std::unique_ptr<HeldControl>(std::make_unique<HeldQmp>(std::move(qmp)));
  }

  Result<RamChanges> capture_changes(const VmDirectory& vm, std::span<uint8_t> ram,
                                     const CaptureOptions& options) override {
    DELTAVM_ASSIGN_OR_RETURN(VmRecord record, vm.read_record());
    if (record.ram_file.empty() || !record.process) {
      return make_error(ErrorCode::kNotFound, "VM {}: no RAM file or process recorded", vm.id());
    }
    // Held open while reading, so the pid cannot pass to another process meanwhile.
    DELTAVM_ASSIGN_OR_RETURN(std::optional<Fd> process, open_process(*record.process));
    if (!process) return make_error(ErrorCode::kNotFound, "VM {} is not running", vm.id());
    DELTAVM_ASSIGN_OR_RETURN(QmpClient qmp, QmpClient::connect(vm.control_socket(), deadline_after(kLaunchTimeout)));
    DELTAVM_TRY(require_paused(qmp, vm));
    int pid = record.process->pid;
    DELTAVM_ASSIGN_OR_RETURN(uint64_t ram_address, find_ram_mapping(pid, record.ram_file, ram.size()));
    // QEMU streams the machine state (and every RAM page: the witness) from its migration
    // thread while this one reads the pages the clone changed: both only read a paused VM.
    Fd stream_file(::memfd_create("deltavm-migration", MFD_CLOEXEC));
    if (!stream_file.valid()) return errno_error("memfd_create", errno);
    DELTAVM_TRY(set_ignore_shared(qmp, true));
    DELTAVM_TRY(set_unlimited_bandwidth(qmp));
    DELTAVM_TRY(qmp.send_fd("deltavm-state", stream_file.get()));
    DELTAVM_TRY(qmp.execute("migrate", {{"uri", "fd:deltavm-state"}}));
    // The clone maps its image private: the pages it (or the loader) wrote are its own copies.
    RamChanges changes;
    Status read = [&]() -> Status {
      DELTAVM_ASSIGN_OR_RETURN(changes.pages, private_copies(pid, ram_address, ram.size() / kPageSize));
      DELTAVM_TRY(omit_changed_pages(pid, ram_address, options.omit_pages_for_testing, changes.pages, ram));
      return read_guest_pages(pid, ram_address, changes.pages, ram);
    }();
    Status migrated = qmp.wait_for_migration(kMigrationTimeout);
    DELTAVM_TRY(read);
    DELTAVM_TRY(migrated);
    struct stat st {};
    if (::fstat(stream_file.get(), &st) != 0) return errno_error("stat migration stream", errno);
    // Every page at most once, with a header, plus the devices: anything longer is not a stream.
    uint64_t most = ram.size() + ram.size() / kPageSize * 300 + kMaxMachineStateBytes;
    if (static_cast<uint64_t>(st.st_size) > most) {
      return make_error(ErrorCode::kCorruption, "VM {}: a migration stream of {} bytes, more than {}", vm.id(),
                        st.st_size, most);
    }
    DELTAVM_ASSIGN_OR_RETURN(Mapping stream, Mapping::map(stream_file.get(), static_cast<size_t>(st.st_size), PROT_READ,
                                                          MAP_PRIVATE, 0, "migration stream"));
    changes.check = [stream = std::make_shared<Mapping>(std::move(stream)),
                     id = vm.id()](std::span<const uint8_t> captured) {
      return machine_state_witnessed(stream->bytes(), captured, id);
    };
    return changes;
  }

  Status read_memory(const VmDirectory& vm, std::span<uint8_t> out) override {
    DELTAVM_ASSIGN_OR_RETURN(VmRecord record, vm.read_record());
    if (record.ram_file.empty() || !record.process) {
      return make_error(ErrorCode::kNotFound, "VM {}: no RAM file or process recorded", vm.id());
    }
    // Held open while reading, so the pid cannot pass to another process meanwhile.
    DELTAVM_ASSIGN_OR_RETURN(std::optional<Fd> process, open_process(*record.process));
    if (!process) return make_error(ErrorCode::kNotFound, "VM {} is not running", vm.id());
    int pid = record.process->pid;
    DELTAVM_ASSIGN_OR_RETURN(uint64_t ram_address, find_ram_mapping(pid, record.ram_file, out.size()));
    constexpr size_t kChunk = 1 << 20;
    for (size_t offset = 0; offset < out.size(); offset += kChunk) {
      size_t length = std::min(kChunk, out.size() - offset);
      iovec local{out.data() + offset, length};
      iovec remote{reinterpret_cast<void*>(ram_address + offset), length};  // NOLINT(performance-no-int-to-ptr)
      ssize_t n = ::process_vm_readv(pid, &local, 1, &remote, 1, 0);
      if (n != static_cast<ssize_t>(length)) {
        return errno_error(fmt::format("process_vm_readv from qemu {}", pid), n < 0 ? errno : EIO);
      }
    }
    return {};
  }

  std::optional<std::string> ended(const VmDirectory& vm) override { return processes_.ended(vm); }

  Status stop(const VmDirectory& vm) override {
    return processes_.stop(vm, [&] {
      Result<QmpClient> qmp = QmpClient::connect(vm.control_socket(), deadline_after(std::chrono::seconds(2)));
      if (qmp) (void)qmp->execute("quit", nullptr, std::chrono::seconds(2));
    });
  }

 private:
  // Starts QEMU, keeps it as this backend's child and records it in the VM's record.
  Result<ProcessIdentity> launch(const VmDirectory& vm, const SpawnOptions& options,
                                 const std::filesystem::path& ram_file) {
    return processes_.launch(vm, options, "qemu", ram_file);
  }

  // Connects to QMP of a QEMU just started; if it dies first, the error carries its log.
  Result<QmpClient> connect_to_new_qemu(const VmDirectory& vm) {
    Deadline deadline = deadline_after(kLaunchTimeout);
    for (;;) {
      Result<QmpClient> client =
          QmpClient::connect(vm.control_socket(), std::min(deadline, deadline_after(std::chrono::milliseconds(50))));
      if (client) return client;
      std::optional<std::string> exit = processes_.exit_of(vm.id());
      if (exit) return make_error(ErrorCode::kIo, "qemu {} at start: {}", *exit, tail_of_log(vm.log_file()));
      if (Clock::now() >= deadline) return client.error();
    }
  }

  VmProcesses processes_;  // The QEMUs this backend started.
  Result<JailPolicy> jail_policy_ = JailPolicy::from_environment();
};

}  // namespace

Status save_stock_snapshot(const VmDirectory& vm, const std::filesystem::path& stream) {
  DELTAVM_ASSIGN_OR_RETURN(QmpClient qmp, QmpClient::connect(vm.control_socket(), deadline_after(kLaunchTimeout)));
  DELTAVM_TRY(qmp.execute("stop"));
  DELTAVM_TRY(set_ignore_shared(qmp, false));
  DELTAVM_TRY(set_unlimited_bandwidth(qmp));
  DELTAVM_ASSIGN_OR_RETURN(Fd file, open_file(stream, O_WRONLY | O_CREAT | O_TRUNC, 0600));
  return migrate_to_fd(qmp, file.get());
}

Result<RestoreTimings> restore_stock_snapshot(const MachineSpec& machine, const std::filesystem::path& stream,
                                              const VmDirectory& vm) {
  RestoreTimings timings;
  auto start = Clock::now();
  DELTAVM_ASSIGN_OR_RETURN(Fd file, open_file(stream, O_RDONLY));
  SpawnOptions options;
  DELTAVM_ASSIGN_OR_RETURN(options.argv, machine_arguments(machine, {}, false, vm));
  options.argv.insert(options.argv.end(), {"-incoming", "defer"});
  options.log = vm.log_file();
  options.pass_fds = {{file.get(), kIncomingStateFd}};
  DELTAVM_ASSIGN_OR_RETURN(std::optional<Jail> jail, jail_qemu(JailPolicy::from_environment(), vm, machine, options));
  DELTAVM_ASSIGN_OR_RETURN(Subprocess qemu, Subprocess::spawn(options));
  DELTAVM_TRY(vm.update_record([&](VmRecord& record) {
    record.backend = "qemu";
    record.process = qemu.identity();
  }));
  Deadline deadline = deadline_after(kLaunchTimeout);
  Result<QmpClient> connected = QmpClient::connect(vm.control_socket(), deadline);
  if (!connected) return connected.error().with_context(tail_of_log(vm.log_file()));
  QmpClient& qmp = *connected;
  timings.launch_ms = elapsed_ms(start);
  auto state_start = Clock::now();
  DELTAVM_TRY(qmp.execute("migrate-incoming", {{"uri", fmt::format("fd:{}", kIncomingStateFd)}}));
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
  std::error_code error;
  if (std::filesystem::exists("/sys/module/kvm_pvm", error)) {
    return {"tcg", fmt::format("KVM here is software nested virtualisation (module kvm_pvm{}): ring-0 guest code "
                               "would be emulated about 1000x slower than TCG runs it",
                               device ? "" : "; /dev/kvm is absent too")};
  }
  if (!device) return {"tcg", "/dev/kvm is not available"};
  return {"kvm", "/dev/kvm is hardware-backed"};
}

std::unique_ptr<Backend> make_qemu_backend() { return std::make_unique<QemuBackend>(); }

}  // namespace deltavm
