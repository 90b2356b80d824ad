#include "base/subprocess.h"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <thread>

namespace deltavm {
namespace {

// "/autogroup-123 nice 10" -> 10.
std::optional<int> session_group_nice(pid_t pid) {
  std::ifstream file(fmt::format("/proc/{}/autogroup", pid));
  std::string group, word;
  int nice = 0;
  if (!(file >> group >> word >> nice) || word != "nice") return std::nullopt;
  return nice;
}

// A VM process leads a session of its own; where the kernel schedules sessions as groups, a
// child started at low priority (a pool refill) must stay low next to the other groups.
TEST(Subprocess, NewSessionKeepsTheSpawningThreadsNiceAndCanBeSetBack) {
  if (!session_group_nice(::getpid())) GTEST_SKIP() << "no /proc/PID/autogroup here (kernel without autogroup)";
  std::optional<Subprocess> child;
  std::thread low([&] {
    ASSERT_EQ(::setpriority(PRIO_PROCESS, 0, 10), 0);
    Result<Subprocess> spawned = Subprocess::spawn({.argv = {"sleep", "30"}});
    ASSERT_TRUE(spawned) << spawned.error().message;
    child.emplace(std::move(*spawned));
  });
  low.join();
  ASSERT_TRUE(child);
  child->kill_on_destroy();
  EXPECT_EQ(session_group_nice(child->pid()), 10);
  EXPECT_EQ(::getpriority(PRIO_PROCESS, static_cast<id_t>(child->pid())), 10);

  Status normal = set_process_nice(child->pid(), 0);
  ASSERT_TRUE(normal) << normal.error().message;
  EXPECT_EQ(session_group_nice(child->pid()), 0);
  EXPECT_EQ(::getpriority(PRIO_PROCESS, static_cast<id_t>(child->pid())), 0);
}

TEST(Subprocess, SessionPriorityIsRefusedToAProcessThatDoesNotLeadItsSession) {
  if (!session_group_nice(::getpid())) GTEST_SKIP() << "no /proc/PID/autogroup here (kernel without autogroup)";
  if (::getsid(0) == ::getpid()) GTEST_SKIP() << "the test runner leads its session";
  Status refused = set_session_group_nice(::getpid(), 5);
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message.find("does not lead its session"), std::string::npos) << refused.error().message;
}

}  // namespace
}  // namespace deltavm
