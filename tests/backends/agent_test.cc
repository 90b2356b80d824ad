// The exec channel against real Linux guests under QEMU: commands that never end, commands
// the host gave up on, background processes, concurrent commands, requests too long to take,
// and a guest that floods its agent's serial port. Each must leave the channel usable, kill
// what it should, and cost the host bounded memory.
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/socket.h>

#include <chrono>
#include <thread>

#include "backends/agent_client.h"
#include "base/file.h"
#include "support/command.h"
#include "support/guest_templates.h"

extern "C" {
#include "agent_protocol.h"
}

namespace deltavm {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

class AgentChannel : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::GuestTemplates> templates = testing::guest_templates();
    ASSERT_TRUE(templates) << templates.error().message;
    templates_ = *templates;
    runtime_ = templates_.root / "agent-runtime";
    Result<StartedVm> vm = start_vm("base", *templates_.store, *templates_.backend, runtime_);
    ASSERT_TRUE(vm) << vm.error().message;
    id_ = vm->id;
    Result<VmDirectory> directory = VmDirectory::open(runtime_, id_);
    ASSERT_TRUE(directory);
    vm_.emplace(*directory);
  }
  void TearDown() override {
    if (!id_.empty()) (void)stop_vm(id_, *templates_.backend, runtime_);
  }

  Result<ExecResult> exec(const std::string& command, std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
    return agent_exec(vm_->agent_socket(), command, timeout);
  }
  std::vector<std::string> cli(std::vector<std::string> arguments) {
    arguments.insert(arguments.begin(),
                     {"--store", (templates_.root / "store").string(), "--runtime", runtime_.string()});
    return arguments;
  }

  testing::GuestTemplates templates_;
  std::filesystem::path runtime_;
  std::string id_;
  std::optional<VmDirectory> vm_;
};

TEST_F(AgentChannel, NeverEndingCommandIsKilledAtItsTimeoutAndTheVmStillAnswers) {
  auto start = Clock::now();
  Result<ExecResult> stuck = exec("sleep 1000", std::chrono::seconds(2));
  ASSERT_TRUE(stuck) << stuck.error().message;
  EXPECT_TRUE(stuck->timed_out);
  EXPECT_EQ(stuck->signal, 9);
  EXPECT_LT(seconds_since(start), 6);
  Result<ExecResult> after = exec("echo still-here; pidof sleep || echo no-sleep-left");
  ASSERT_TRUE(after) << after.error().message;
  EXPECT_EQ(after->stdout_bytes, "still-here\nno-sleep-left\n");
}

// The host reported the command as timed out: it must not go on to do its work later.
TEST_F(AgentChannel, CommandReportedTimedOutDoesNotRunLater) {
  Result<ExecResult> cut = exec("sleep 3; touch /tmp/late", std::chrono::seconds(1));
  ASSERT_TRUE(cut) << cut.error().message;
  EXPECT_TRUE(cut->timed_out);
  std::this_thread::sleep_for(std::chrono::seconds(4));
  Result<ExecResult> check = exec("test -e /tmp/late");
  ASSERT_TRUE(check) << check.error().message;
  EXPECT_EQ(check->exit_status, 1) << "the timed-out command ran on";
}

TEST_F(AgentChannel, WaitForTheExecLockEndsAtTheTimeout) {
  std::filesystem::path lock_path = vm_->agent_socket();
  lock_path += ".lock";
  Result<Fd> lock = open_file(lock_path, O_RDWR | O_CREAT, 0600);
  ASSERT_TRUE(lock);
  ASSERT_EQ(::flock(lock->get(), LOCK_EX), 0);
  testing::CommandOptions options;
  options.timeout = std::chrono::seconds(30);
  auto start = Clock::now();
  testing::CommandResult blocked = testing::run_deltavm(cli({"exec", "--timeout", "1", id_, "--", "true"}), options);
  EXPECT_FALSE(blocked.timed_out) << "exec waited for the lock past its timeout";
  EXPECT_EQ(blocked.status, 1);
  EXPECT_NE(blocked.err.find("held the VM's exec channel"), std::string::npos) << blocked.err;
  EXPECT_LT(seconds_since(start), 15);
}

TEST_F(AgentChannel, BackgroundProcessesDoNotHoldTheCommand) {
  for (const char* command : {"sleep 60 >/dev/null 2>&1 & echo started", "sleep 60 & echo started"}) {
    auto start = Clock::now();
    Result<ExecResult> result = exec(command);
    ASSERT_TRUE(result) << result.error().message;
    EXPECT_EQ(result->stdout_bytes, "started\n") << command;
    EXPECT_LT(seconds_since(start), 5) << command;
  }
  // Nothing the agent holds was inherited: the background sleep has only its std streams.
  Result<ExecResult> fds = exec("ls /proc/$(pidof sleep | cut -d' ' -f1)/fd | sort -n | tr '\\n' ' '");
  ASSERT_TRUE(fds) << fds.error().message;
  EXPECT_EQ(fds->stdout_bytes, "0 1 2 ");
}

TEST_F(AgentChannel, CommandsRunConcurrentlyOverOneConnection) {
  Result<AgentConnection> connection =
      AgentConnection::connect(vm_->agent_socket(), deadline_after(std::chrono::seconds(10)));
  ASSERT_TRUE(connection) << connection.error().message;
  Deadline deadline = deadline_after(std::chrono::seconds(60));
  ExecRequest slow{"sleep 4; echo slow", std::nullopt, std::chrono::seconds(30)};
  ExecRequest fast{"echo fast", std::nullopt, std::chrono::seconds(30)};
  auto start = Clock::now();
  Result<uint64_t> slow_id = connection->start(slow, deadline);
  Result<uint64_t> fast_id = connection->start(fast, deadline);
  ASSERT_TRUE(slow_id && fast_id);
  Result<ExecResult> fast_result = connection->wait(*fast_id, deadline);
  ASSERT_TRUE(fast_result) << fast_result.error().message;
  EXPECT_EQ(fast_result->stdout_bytes, "fast\n");
  EXPECT_LT(seconds_since(start), 3) << "the fast command waited for the slow one";
  Result<ExecResult> slow_result = connection->wait(*slow_id, deadline);
  ASSERT_TRUE(slow_result) << slow_result.error().message;
  EXPECT_EQ(slow_result->stdout_bytes, "slow\n");
}

// A request longer than the agent takes is read past whole: nothing inside it is taken for a
// frame (an embedded request would otherwise run as a second command).
TEST_F(AgentChannel, OverlongRequestIsReadPastWholeAndNothingInsideItRuns) {
  auto frame = [](char kind, uint64_t id, const std::string& payload) {
    unsigned char header[AGENT_HEADER_BYTES];
    agent_make_header(header, kind, id, payload.data(), static_cast<uint32_t>(payload.size()));
    return std::string(reinterpret_cast<const char*>(header), sizeof header) + payload;
  };
  std::string smuggled = std::string(8, '\0') + "touch /tmp/smuggled";
  std::string payload(8, '\0');
  while (payload.size() < AGENT_MAX_FRAME_BYTES + 50000) payload += frame('X', 77, smuggled);
  std::string request = frame('X', 42, payload);
  Result<Fd> socket = connect_unix(vm_->agent_socket(), deadline_after(std::chrono::seconds(10)));
  ASSERT_TRUE(socket) << socket.error().message;
  ASSERT_TRUE(send_all(socket->get(), request, "agent"));
  // The agent answers the long request's id with a failure frame.
  std::string received;
  Deadline deadline = deadline_after(std::chrono::seconds(60));
  std::string expected_kind_and_id = std::string("F") + std::string(3, '\0');
  bool refused = false;
  while (!refused) {
    ASSERT_TRUE(read_some(socket->get(), received, deadline, "agent"));
    for (size_t at = received.find(AGENT_MAGIC); at != std::string::npos && at + AGENT_HEADER_BYTES <= received.size();
         at = received.find(AGENT_MAGIC, at + 1)) {
      const auto* header = reinterpret_cast<const unsigned char*>(received.data() + at);
      if (agent_header_valid(header) && header[4] == 'F' && agent_get_u64(header + 8) == 42) refused = true;
    }
  }
  socket = Result<Fd>(Fd());
  Result<ExecResult> check = exec("test -e /tmp/smuggled");
  ASSERT_TRUE(check) << check.error().message;
  EXPECT_EQ(check->exit_status, 1) << "a request inside the overlong one ran";
  // And the host refuses to send such a command at all.
  Result<ExecResult> too_long = exec(std::string(kMaxCommandBytes + 1, 'x'));
  ASSERT_FALSE(too_long);
  EXPECT_NE(too_long.error().message.find("sh -s"), std::string::npos) << too_long.error().message;
}

// A guest process that writes megabytes of non-frames to the agent's port: the host skips
// them in bounded memory and still gets the command's answer.
TEST_F(AgentChannel, FloodOfNonFramesCostsTheHostBoundedMemory) {
  testing::CommandResult quiet = testing::run_deltavm(cli({"exec", id_, "--", "true"}));
  ASSERT_EQ(quiet.status, 0) << quiet.err;
  testing::CommandOptions options;
  options.timeout = std::chrono::minutes(3);
  testing::CommandResult flooded = testing::run_deltavm(
      cli({"exec", "--timeout", "120", id_, "--", "head -c 4000000 /dev/zero > /dev/ttyS1; echo after"}), options);
  ASSERT_EQ(flooded.status, 0) << flooded.err;
  EXPECT_EQ(flooded.out, "after\n");
  EXPECT_LT(flooded.max_rss_kib, quiet.max_rss_kib + 2048) << "the host buffered the flood";
}

}  // namespace
}  // namespace deltavm
