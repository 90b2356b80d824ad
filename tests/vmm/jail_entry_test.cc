// deltavm-vmm's jail (vmm/jail_entry.h), entered by a forked child of the test in a mount
// namespace of its own: host-only, it needs root but no /dev/kvm.
#include "vmm/jail_entry.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "base/file.h"

namespace deltavm::vmm {
namespace {

constexpr uint32_t kUid = 2'065'000;

// Runs `body` in a forked child; returns what it wrote to the pipe (one finding per line) and
// how it ended.
std::pair<std::string, int> in_child(const std::function<void(int)>& body) {
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) return {"pipe failed", -1};
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(pipe_fds[0]);
    body(pipe_fds[1]);
    ::_exit(0);
  }
  ::close(pipe_fds[1]);
  std::string said;
  char buffer[512];
  for (ssize_t n; (n = ::read(pipe_fds[0], buffer, sizeof buffer)) > 0;) said.append(buffer, static_cast<size_t>(n));
  ::close(pipe_fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return {said, status};
}

void say(int fd, const std::string& line) {
  std::string text = line + "\n";
  (void)!::write(fd, text.data(), text.size());
}

// "opened", "refused" (a read-only mount or no permission: which one the kernel checks first
// is its business), "absent", or what else open said.
std::string open_result(const std::filesystem::path& path, int flags) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC, 0600);
  if (fd >= 0) {
    ::close(fd);
    return "opened";
  }
  if (errno == EROFS || errno == EACCES) return "refused";
  if (errno == ENOENT) return "absent";
  return std::strerror(errno);
}

class Jail : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "entering a jail needs root";
    root_ = std::filesystem::path(::testing::TempDir()) / "jail_entry_test";
    std::filesystem::remove_all(root_);
    for (const char* name : {"mount-point", "vm/process", "store", "other"})
      std::filesystem::create_directories(root_ / name);
    std::ofstream(root_ / "store" / "base.ram") << "base bytes";
    std::ofstream(root_ / "vm" / "overlay") << "overlay bytes";
    std::ofstream(root_ / "other" / "secret") << "secret";
    std::filesystem::permissions(root_ / "store" / "base.ram", std::filesystem::perms(0444));
    std::filesystem::permissions(root_ / "vm" / "overlay", std::filesystem::perms(0600));
    ASSERT_EQ(::chown((root_ / "vm" / "process").c_str(), kUid, kUid), 0);
    ASSERT_EQ(::chown((root_ / "vm" / "overlay").c_str(), kUid, kUid), 0);
    setup_ = {root_ / "mount-point",
              kUid,
              std::filesystem::canonical(root_ / "vm" / "process"),
              {std::filesystem::canonical(root_ / "store" / "base.ram"),
               std::filesystem::canonical(root_ / "vm" / "overlay")}};
  }
  void TearDown() override {
    if (!root_.empty()) std::filesystem::remove_all(root_);
  }
  std::filesystem::path root_;
  JailSetup setup_;
};

TEST_F(Jail, LeavesOnlyItsPathsAnUnprivilegedUidAndNoMountOnTheHost) {
  auto [said, status] = in_child([&](int out) {
    if (::unshare(CLONE_NEWNS) != 0) return say(out, fmt::format("unshare: {}", std::strerror(errno)));
    ::umask(0177);  // deltavm-vmm's.
    if (Status entered = enter_jail(setup_); !entered) return say(out, "enter: " + entered.error().message);
    say(out, fmt::format("uid {} gid {}", ::getuid(), ::getgid()));
    Result<std::vector<uint8_t>> base = read_file(setup_.read_only[0]);
    say(out, "base: " + (base ? std::string(base->begin(), base->end()) : base.error().message));
    Result<std::vector<uint8_t>> overlay = read_file(setup_.read_only[1]);
    say(out, "overlay: " + (overlay ? std::string(overlay->begin(), overlay->end()) : overlay.error().message));
    say(out, "write base: " + open_result(setup_.read_only[0], O_WRONLY));
    say(out, "write overlay: " + open_result(setup_.read_only[1], O_WRONLY));
    say(out, "create in directory: " + open_result(setup_.writable / "state.out", O_WRONLY | O_CREAT));
    say(out, "create beside it: " + open_result(setup_.writable.parent_path() / "vm.json", O_WRONLY | O_CREAT));
    say(out, "create in /: " + open_result("/planted", O_WRONLY | O_CREAT));
    say(out, "secret: " + open_result(root_ / "other" / "secret", O_RDONLY));
    say(out, "passwd: " + open_result("/etc/passwd", O_RDONLY));
    say(out, "chroot: " + std::string(::chroot("/") == 0 ? "done" : std::strerror(errno)));
  });
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << said;
  std::string expected = fmt::format(
      "uid {0} gid {0}\n"
      "base: base bytes\n"
      "overlay: overlay bytes\n"
      "write base: refused\n"
      "write overlay: refused\n"
      "create in directory: opened\n"
      "create beside it: refused\n"
      "create in /: refused\n"
      "secret: absent\n"
      "passwd: absent\n"
      "chroot: Operation not permitted\n",
      kUid);
  EXPECT_EQ(said, expected);
  // What it wrote is in its directory on the host, and none of its mounts reached the host.
  EXPECT_TRUE(std::filesystem::exists(root_ / "vm" / "process" / "state.out"));
  std::ifstream mounts("/proc/self/mountinfo");
  std::stringstream text;
  text << mounts.rdbuf();
  EXPECT_EQ(text.str().find("deltavm-jail"), std::string::npos) << text.str();
  EXPECT_EQ(text.str().find(root_.string()), std::string::npos) << text.str();
}

TEST_F(Jail, RefusesUidZero) {
  setup_.uid = 0;
  Status entered = enter_jail(setup_);
  ASSERT_FALSE(entered);
  EXPECT_NE(entered.error().message.find("uid 0"), std::string::npos) << entered.error().message;
}

}  // namespace
}  // namespace deltavm::vmm
