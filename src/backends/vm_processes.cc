#include "backends/vm_processes.h"

namespace deltavm {

Result<ProcessIdentity> VmProcesses::launch(const VmDirectory& vm, const SpawnOptions& options,
                                            std::string_view backend, const std::filesystem::path& ram_file) {
  DELTAVM_ASSIGN_OR_RETURN(Subprocess process, Subprocess::spawn(options));
  ProcessIdentity identity = process.identity();
  {
    std::lock_guard lock(mutex_);
    children_.insert_or_assign(vm.id(), std::move(process));
  }
  DELTAVM_TRY(vm.update_record([&](VmRecord& record) {
    record.backend = std::string(backend);
    record.process = identity;
    record.ram_file = ram_file.string();
  }));
  return identity;
}

std::optional<std::string> VmProcesses::exit_of(const std::string& id) {
  std::lock_guard lock(mutex_);
  auto it = children_.find(id);
  if (it == children_.end()) return std::nullopt;
  Result<std::optional<int>> status = it->second.poll_exit();
  if (!status) return status.error().message;
  if (!*status) return std::nullopt;
  return describe_wait_status(**status);
}

std::optional<std::string> VmProcesses::ended(const VmDirectory& vm) {
  if (std::optional<std::string> exit = exit_of(vm.id())) return exit;
  {
    std::lock_guard lock(mutex_);
    if (children_.contains(vm.id())) return std::nullopt;
  }
  Result<VmRecord> record = vm.read_record();
  if (!record) return fmt::format("unknown ({})", record.error().message);
  if (!record->process) return "never started";
  Result<std::optional<Fd>> process = open_process(*record->process);
  if (process && !*process) return "exited";
  return std::nullopt;  // Running, or not known to have ended (it is looked at again later).
}

Status VmProcesses::stop(const VmDirectory& vm, const std::function<void()>& ask_to_quit) {
  std::optional<Subprocess> child;
  {
    std::lock_guard lock(mutex_);
    if (auto it = children_.find(vm.id()); it != children_.end()) {
      child.emplace(std::move(it->second));
      children_.erase(it);
    }
  }
  std::optional<ProcessIdentity> identity;
  if (child) {
    identity = child->identity();
  } else if (Result<VmRecord> record = vm.read_record()) {
    identity = record->process;
  }
  // A process that cannot be looked at is not taken for gone: the stop fails, and the child
  // stays ours, so that the VM is never forgotten while it may still run.
  auto keep_child = [&] {
    if (!child) return;
    std::lock_guard lock(mutex_);
    children_.emplace(vm.id(), std::move(*child));
  };
  if (identity) {
    Result<std::optional<Fd>> process = open_process(*identity);
    if (!process) {
      keep_child();
      return process.error();
    }
    if (*process) {
      ask_to_quit();
      if (Status ended = terminate_process(*identity, std::chrono::seconds(5)); !ended) {
        keep_child();
        return ended;
      }
    }
  }
  if (child) (void)child->wait(deadline_after(std::chrono::seconds(5)));  // Reaps our own child.
  return {};
}

}  // namespace deltavm
