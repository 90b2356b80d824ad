// Per-VM resource limits: every jailed VM process runs in cgroups of its own, made before it
// starts and joined by it before it execs, so no byte or task of it is ever outside them.
//
//   cgroup v2:  /sys/fs/cgroup/deltavm/NAME            memory.max, cpu.max, pids.max
//   cgroup v1:  /sys/fs/cgroup/{memory,cpu,pids}/deltavm/NAME   (each where that controller
//               is mounted) memory.limit_in_bytes, cpu.cfs_quota_us, pids.max
//
// NAME is vm_cgroup_name: the VM's id after a hash of its runtime directory, since VM ids are
// unique only within a runtime and cgroups are the host's.
//
// A host without a controller runs the VM without that limit, and says so (doctor, and the
// VM's log), never silently. The cgroups go with the VM's directory (VmDirectory::remove).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/file.h"

namespace deltavm {

struct ResourceLimits {
  uint64_t memory_bytes = 0;  // Everything the process holds: the guest's RAM and its own.
  uint32_t cpus = 1;          // CPU time, in whole CPUs.
  uint32_t pids = 512;        // Tasks (threads included).
};

// The limits for a VM process with `memory_bytes` of guest RAM and `vcpus`: the RAM plus
// `overhead_bytes` for the process itself, one CPU a vCPU plus one for its own threads.
ResourceLimits vm_process_limits(uint64_t memory_bytes, uint32_t vcpus, uint64_t overhead_bytes);

struct VmCgroups {
  std::vector<Fd> procs;             // Each cgroup's cgroup.procs, open for the process to join.
  std::vector<std::string> set;      // What is enforced, e.g. "memory 1.3 GiB".
  std::vector<std::string> missing;  // What this host cannot enforce, and why.
};

// The name of the cgroups of VM `vm_id` of `runtime`: "RRRRRRRR-ID", R the FNV-1a hash of the
// runtime's canonical path.
std::string vm_cgroup_name(const std::filesystem::path& runtime, const std::string& vm_id);

// Makes the cgroups `name` (vm_cgroup_name) with `limits`, where the host has the controllers. Needs root.
Result<VmCgroups> create_vm_cgroups(const std::string& name, const ResourceLimits& limits);

// A VM process's priority against the other VMs: in a cgroup of its own, its threads' nice
// values weigh only against each other, so the cgroup's CPU weight (v1 cpu.shares, v2
// cpu.weight) is set to what the kernel gives a task of nice `nice`. create_vm_cgroups starts
// it at the calling thread's nice (as a forked child's nice is). Nothing to do for a VM without
// cgroups.
Status set_vm_cpu_priority(const std::string& name, int nice);

// Removes the cgroups `name`, once its process has ended; a process still in them (one its
// starter died before recording) is killed first. Missing cgroups are fine.
Status remove_vm_cgroups(const std::string& name);

// What this host can enforce, for doctor.
std::string describe_cgroups();

}  // namespace deltavm
