// The control protocol of deltavm-vmm (docs/kvm.md): the kvm backend on the host and the VMM
// process speak it over the VM's control socket, one JSON object per line each way. Every
// request and every reply is a type of its own; one decoder reads each direction, checks every
// field (type, range, no unknown fields) and never throws, so a malformed request gets an
// error reply and the VMM keeps serving. An error reply carries its ErrorCode, so an error
// keeps its kind across the process boundary.
//
// This library (with the RAM overlay format) is all the host links of the VMM: the machine,
// KVM and the devices live in deltavm-vmm alone.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>

#include "base/error.h"

namespace deltavm::vmm {

// How a restored VM gets its RAM (guest_memory.h describes each).
enum class MemoryStrategy { kEager, kPrivate, kUserfault };
Result<MemoryStrategy> parse_memory_strategy(std::string_view name);
std::string_view memory_strategy_name(MemoryStrategy strategy);

// How a newly booted or restored machine starts.
struct StartOptions {
  bool paused = false;                          // Loaded, but no vCPU runs until resume.
  std::optional<uint64_t> pause_at_checkpoint;  // Micro guest: park after this checkpoint.
  bool log_dirty = false;                       // KVM dirty logging on the RAM slot.
  bool operator==(const StartOptions&) const = default;
};

// Boots the micro guest (guest/micro), a test and benchmark workload.
struct BootMicroRequest {
  std::string program;  // The flat binary.
  uint64_t memory_bytes = 0;
  std::optional<uint64_t> work_bytes;  // Default: all memory above 16 MiB.
  uint64_t passes = 4;
  uint64_t seed = 1;
  uint64_t heartbeat_bytes = 1 << 20;
  std::optional<std::string> ram_file;  // RAM in this file, shared (for captures).
  StartOptions start;
  bool operator==(const BootMicroRequest&) const = default;
};

// Boots a Linux bzImage through the 64-bit boot protocol.
struct BootLinuxRequest {
  std::string kernel;
  std::string initrd;
  std::string command_line;
  uint64_t memory_bytes = 0;
  uint32_t vcpus = 1;
  std::optional<std::string> ram_file;
  StartOptions start;
  bool operator==(const BootLinuxRequest&) const = default;
};

// Loads a machine from a saved state onto a base image with the overlay's pages over it.
struct RestoreRequest {
  std::string state;
  std::string base;
  std::optional<std::string> overlay;
  MemoryStrategy strategy = MemoryStrategy::kUserfault;
  StartOptions start;
  // Benchmark probes: time the first guest instruction (single-stepped) and wait until the
  // guest's first port access before answering.
  bool step_first_instruction = false;
  bool wait_first_report = false;
  bool operator==(const RestoreRequest&) const = default;
};

struct StatusRequest {
  bool operator==(const StatusRequest&) const = default;
};
struct PauseRequest {
  bool operator==(const PauseRequest&) const = default;
};
struct ResumeRequest {
  std::optional<uint64_t> pause_at_checkpoint;
  bool operator==(const ResumeRequest&) const = default;
};
// Waits until the machine is not running, or `timeout_ms`.
struct WaitRequest {
  uint64_t timeout_ms = 60000;
  bool operator==(const WaitRequest&) const = default;
};
// Writes what it names, from a paused machine: its state, its dirty bitmap since the last one,
// a copy of its RAM; `changes`: the pages the guest wrote since the machine started (its dirty
// log since then: a bitmap of ceil(pages / 8) bytes, then each page it sets, in order);
// `digest`: the XXH3-128 of its whole RAM in the reply, read without faulting in what a lazy
// load has not served (the witness a snapshot's capture is checked against).
struct SaveRequest {
  std::optional<std::string> state;
  std::optional<std::string> dirty;
  std::optional<std::string> ram;
  std::optional<std::string> changes;
  bool digest = false;
  bool operator==(const SaveRequest&) const = default;
};
// What the guest wrote to serial port `port` (0 or 1), the last MiB.
struct SerialOutputRequest {
  uint32_t port = 0;
  bool operator==(const SerialOutputRequest&) const = default;
};
// Benchmark: a bare VM and vCPU to its first exit, the floor of any restore.
struct FloorRequest {
  bool operator==(const FloorRequest&) const = default;
};
struct QuitRequest {
  bool operator==(const QuitRequest&) const = default;
};

using Request = std::variant<BootMicroRequest, BootLinuxRequest, RestoreRequest, StatusRequest, PauseRequest,
                             ResumeRequest, WaitRequest, SaveRequest, SerialOutputRequest, FloorRequest, QuitRequest>;

enum class RunState { kPaused, kRunning, kDone, kFailed };
std::string_view run_state_name(RunState state);

// What the micro guest reported over its ports (guest/micro/workload.c).
struct MicroGuestReport {
  uint64_t checkpoint = 0;  // Passes completed.
  uint64_t heartbeats = 0;
  bool done = false;
  uint32_t done_status = 0;
  uint64_t checksum = 0;  // Valid when done.
  bool operator==(const MicroGuestReport&) const = default;
};

struct UserfaultCounts {
  uint64_t overlay_pages = 0;
  uint64_t base_pages = 0;
  uint64_t zero_pages = 0;
  bool operator==(const UserfaultCounts&) const = default;
};

// A restore's timings in microseconds from the request's arrival (-1: did not happen).
struct RestoreTimings {
  double memory_us = 0;
  double machine_us = 0;
  double first_instruction_us = -1;
  double first_report_us = -1;
  bool operator==(const RestoreTimings&) const = default;
};

// The answer to boot, restore, status, pause, resume and wait.
struct StatusReply {
  RunState state = RunState::kPaused;
  std::string failure;  // Why the machine failed, when it did.
  std::optional<MicroGuestReport> micro;
  std::optional<UserfaultCounts> userfault;
  std::optional<RestoreTimings> timings;  // Restores only.
  bool operator==(const StatusReply&) const = default;
};
struct SaveReply {
  std::optional<uint64_t> state_bytes;
  std::optional<uint64_t> dirty_pages;
  std::optional<uint64_t> changed_pages;
  std::optional<std::string> ram_digest;  // 32 hex digits, high 64 bits first.
  bool operator==(const SaveReply&) const = default;
};
struct SerialOutputReply {
  std::string text;
  bool operator==(const SerialOutputReply&) const = default;
};
struct FloorReply {
  double floor_us = 0;
  bool operator==(const FloorReply&) const = default;
};
struct QuitReply {
  bool operator==(const QuitReply&) const = default;
};

using Reply = std::variant<StatusReply, SaveReply, SerialOutputReply, FloorReply, QuitReply>;

// The longest line either side sends or accepts (a serial_output reply holds up to 1 MiB of
// escaped text).
inline constexpr size_t kMaxLineBytes = 8 << 20;
// The largest saved machine state either side reads from a file.
inline constexpr uint64_t kMaxStateBytes = 64ull << 20;

std::string encode_request(const Request& request);
Result<Request> decode_request(std::string_view line);
// An error reply carries the Error's code and message.
std::string encode_reply(const Result<Reply>& reply);
// Decodes a reply; an error reply becomes that Error (code and message).
Result<Reply> decode_reply(std::string_view line);

}  // namespace deltavm::vmm
