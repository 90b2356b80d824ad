// Two hosts on one machine sharing one bucket of a real object store (Swift's s3api), through
// the command line as users drive it: host A pushes counter (base <- counter); host B, which
// never built anything, runs counter cold (fetched and verified on the way) and gets answers,
// makes a child of it (a snapshot) and pushes that; A pulls the child, fetching only what it
// lacks, and runs it. The secret is never in a catalog.
#include <gtest/gtest.h>

#include <fstream>
#include <regex>

#include "support/command.h"
#include "support/guest_templates.h"
#include "support/object_store.h"

namespace deltavm {
namespace {

using testing::CommandOptions;
using testing::CommandResult;
using testing::run_deltavm;

std::string slurp(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

struct Host {
  std::filesystem::path store, runtime;
  const TestObjectStore* object_store = nullptr;

  CommandResult deltavm(const std::vector<std::string>& arguments) const {
    CommandOptions options;
    options.environment = {"DELTAVM_STORE=" + store.string(), "DELTAVM_RUNTIME=" + runtime.string(),
                           "AWS_ACCESS_KEY_ID=" + object_store->credentials.access_key_id,
                           "AWS_SECRET_ACCESS_KEY=" + object_store->credentials.secret_access_key};
    options.timeout = std::chrono::minutes(5);
    return run_deltavm(arguments, options);
  }
  // The catalog's bytes, its write-ahead log included.
  std::string catalog_bytes() const { return slurp(store / "catalog.sqlite") + slurp(store / "catalog.sqlite-wal"); }
};

TEST(TwoHosts, ShareOneBucketAndRunWhatTheOtherBuilt) {
  Result<TestObjectStore> located = TestObjectStore::locate();
  ASSERT_TRUE(located) << located.error().message;
  Result<testing::GuestTemplates> templates = testing::guest_templates();
  ASSERT_TRUE(templates) << templates.error().message;
  Result<S3Client> bucket = located->fresh_bucket("two-hosts");
  ASSERT_TRUE(bucket) << bucket.error().message;
  std::string url = fmt::format("s3://{}/fleet", bucket->bucket().name);

  std::filesystem::path root = std::filesystem::path(::testing::TempDir()) / "deltavm_two_hosts";
  std::filesystem::remove_all(root);
  std::filesystem::create_directories(root);
  // Host A holds the templates the suite built; host B starts empty.
  Host a{root / "a-store", root / "a-run", &*located};
  Host b{root / "b-store", root / "b-run", &*located};
  std::filesystem::copy(templates->store->directory(), a.store, std::filesystem::copy_options::recursive);

  for (const Host* host : {&a, &b}) {
    CommandResult added = host->deltavm({"remote", "add", "origin", url, "--endpoint", located->endpoint});
    ASSERT_EQ(added.status, 0) << added.err;
  }
  CommandResult listed = b.deltavm({"remote", "ls"});
  EXPECT_NE(listed.out.find(url), std::string::npos) << listed.out;
  CommandResult pushed = a.deltavm({"--json", "push", "counter"});
  ASSERT_EQ(pushed.status, 0) << pushed.err;
  EXPECT_NE(pushed.out.find(R"("manifests": [)"), std::string::npos) << pushed.out;

  // B runs counter cold: fetched, verified, loaded; it answers with what A captured.
  CommandResult run = b.deltavm({"run", "counter"});
  ASSERT_EQ(run.status, 0) << run.err;
  EXPECT_NE(run.err.find("pulled counter: 2 image(s)"), std::string::npos) << run.err;
  std::string id = run.out.substr(0, run.out.find('\n'));
  CommandResult marker = b.deltavm({"exec", id, "--", "cat", "/tmp/marker"});
  ASSERT_EQ(marker.status, 0) << marker.err;
  EXPECT_EQ(marker.out, "made-before-capture\n");

  // B makes a child of counter and pushes it: only its own objects travel.
  ASSERT_EQ(b.deltavm({"exec", id, "--", "sh", "-c", "echo made-on-b > /tmp/from-b"}).status, 0);
  CommandResult snapshot = b.deltavm({"snapshot", id, "counter-b", "--stop"});
  ASSERT_EQ(snapshot.status, 0) << snapshot.err;
  CommandResult pushed_child = b.deltavm({"--json", "push", "counter-b"});
  ASSERT_EQ(pushed_child.status, 0) << pushed_child.err;
  EXPECT_NE(pushed_child.out.find(R"("objects_present": )"), std::string::npos);
  std::smatch sent;
  ASSERT_TRUE(std::regex_search(pushed_child.out, sent, std::regex(R"("objects_sent": (\d+))"))) << pushed_child.out;
  EXPECT_EQ(sent[1], "2") << "the child's delta and machine state; counter's objects are there\n" << pushed_child.out;

  // A pulls the child, fetching only its objects, and runs it.
  CommandResult pulled = a.deltavm({"--json", "pull", "counter-b"});
  ASSERT_EQ(pulled.status, 0) << pulled.err;
  EXPECT_NE(pulled.out.find(R"("objects_fetched": 2)"), std::string::npos) << pulled.out;
  EXPECT_NE(pulled.out.find(R"("added": [)"
                            "\n"
                            R"(    "counter-b")"),
            std::string::npos)
      << pulled.out;
  CommandResult child = a.deltavm({"run", "counter-b"});
  ASSERT_EQ(child.status, 0) << child.err;
  std::string child_id = child.out.substr(0, child.out.find('\n'));
  CommandResult from_b = a.deltavm({"exec", child_id, "--", "cat", "/tmp/from-b", "/tmp/marker"});
  ASSERT_EQ(from_b.status, 0) << from_b.err;
  EXPECT_EQ(from_b.out, "made-on-b\nmade-before-capture\n");
  EXPECT_EQ(a.deltavm({"stop", child_id}).status, 0);

  for (const Host* host : {&a, &b}) {
    CommandResult fsck = host->deltavm({"store", "fsck"});
    EXPECT_EQ(fsck.status, 0) << fsck.out << fsck.err;
    EXPECT_EQ(host->catalog_bytes().find(located->credentials.secret_access_key), std::string::npos)
        << "the secret is in the catalog of " << host->store;
  }
  CommandResult removed = b.deltavm({"remote", "rm", "origin"});
  EXPECT_EQ(removed.status, 0) << removed.err;
  CommandResult gone = b.deltavm({"push", "counter-b"});
  EXPECT_NE(gone.status, 0);
  EXPECT_NE(gone.err.find("no remote"), std::string::npos) << gone.err;
  std::filesystem::remove_all(root);
}

}  // namespace
}  // namespace deltavm
