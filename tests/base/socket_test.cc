// Unix sockets: a stale socket file is replaced, a live one is never stolen from its process.
#include "base/socket.h"

#include <gtest/gtest.h>
#include <sys/socket.h>

#include <fstream>

namespace deltavm {
namespace {

std::filesystem::path fresh_directory() {
  std::filesystem::path directory = std::filesystem::path(::testing::TempDir()) / "socket_test";
  std::filesystem::remove_all(directory);
  std::filesystem::create_directories(directory);
  return directory;
}

TEST(UnixSockets, ALiveSocketIsNeverStolen) {
  std::filesystem::path path = fresh_directory() / "live.sock";
  Result<Fd> owner = listen_unix(path);
  ASSERT_TRUE(owner) << owner.error().message;
  Result<Fd> thief = listen_unix(path);
  ASSERT_FALSE(thief);
  EXPECT_EQ(thief.error().code, ErrorCode::kBusy);
  EXPECT_NE(thief.error().message.find("in use"), std::string::npos) << thief.error().message;
  // The owner still gets its clients.
  Result<Fd> client = connect_unix(path, deadline_after(std::chrono::seconds(2)));
  ASSERT_TRUE(client) << client.error().message;
  Fd accepted(::accept4(owner->get(), nullptr, nullptr, SOCK_CLOEXEC));
  EXPECT_TRUE(accepted.valid());
}

TEST(UnixSockets, AStaleSocketIsReplaced) {
  std::filesystem::path path = fresh_directory() / "stale.sock";
  {
    Result<Fd> gone = listen_unix(path);
    ASSERT_TRUE(gone);
  }  // Closed: the file stays, nobody listens.
  ASSERT_TRUE(std::filesystem::exists(path));
  Result<Fd> next = listen_unix(path);
  ASSERT_TRUE(next) << next.error().message;
  Result<Fd> client = connect_unix(path, deadline_after(std::chrono::seconds(2)));
  EXPECT_TRUE(client);
}

TEST(UnixSockets, AFileThatIsNotASocketIsRefused) {
  std::filesystem::path path = fresh_directory() / "data";
  std::ofstream(path) << "keep me";
  Result<Fd> listener = listen_unix(path);
  ASSERT_FALSE(listener);
  EXPECT_NE(listener.error().message.find("not a socket"), std::string::npos) << listener.error().message;
  std::ifstream in(path);
  std::string content((std::istreambuf_iterator<char>(in)), {});
  EXPECT_EQ(content, "keep me");
}

}  // namespace
}  // namespace deltavm
