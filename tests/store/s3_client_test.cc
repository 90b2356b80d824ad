// The S3 client against a real object store (OpenStack Swift's s3api, which checks every
// signature): objects, multipart uploads, ranges, listings, and the errors a user meets.
#include "store/s3_client.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include "support/object_store.h"

namespace deltavm {
namespace {

std::vector<uint8_t> random_bytes(size_t size, uint32_t seed) {
  std::vector<uint8_t> bytes(size);
  std::mt19937 generator(seed);
  for (uint8_t& byte : bytes) byte = static_cast<uint8_t>(generator());
  return bytes;
}

std::span<const uint8_t> bytes_of(std::string_view text) {
  return {reinterpret_cast<const uint8_t*>(text.data()), text.size()};
}

class S3ClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<TestObjectStore> located = TestObjectStore::locate();
    ASSERT_TRUE(located) << located.error().message;
    store_ = *located;
  }
  std::string test_name() const { return ::testing::UnitTest::GetInstance()->current_test_info()->name(); }
  TestObjectStore store_;
};

TEST_F(S3ClientTest, PutGetHeadListAndRemove) {
  Result<S3Client> client = store_.fresh_bucket(test_name());
  ASSERT_TRUE(client) << client.error().message;
  ASSERT_TRUE(client->create_bucket()) << "creating a bucket one owns already is not an error";
  ASSERT_TRUE(client->put("objects/ab/one", bytes_of("first")));
  ASSERT_TRUE(client->put("objects/cd/two", bytes_of("second!")));
  ASSERT_TRUE(client->put("templates/web.json", bytes_of("{}")));

  Result<std::vector<uint8_t>> one = client->get("objects/ab/one", 1024);
  ASSERT_TRUE(one) << one.error().message;
  EXPECT_EQ(std::string(one->begin(), one->end()), "first");
  Result<std::optional<uint64_t>> size = client->head("objects/cd/two");
  ASSERT_TRUE(size && *size);
  EXPECT_EQ(**size, 7u);
  Result<std::optional<uint64_t>> missing = client->head("objects/ef/none");
  ASSERT_TRUE(missing) << missing.error().message;
  EXPECT_FALSE(*missing);

  Result<std::vector<std::pair<std::string, uint64_t>>> listed = client->list("objects/");
  ASSERT_TRUE(listed) << listed.error().message;
  ASSERT_EQ(listed->size(), 2u);
  EXPECT_EQ((*listed)[0], std::make_pair(std::string("objects/ab/one"), uint64_t{5}));
  EXPECT_EQ((*listed)[1], std::make_pair(std::string("objects/cd/two"), uint64_t{7}));

  ASSERT_TRUE(client->remove("objects/ab/one"));
  Result<std::vector<uint8_t>> gone = client->get("objects/ab/one", 1024);
  ASSERT_FALSE(gone);
  EXPECT_EQ(gone.error().code, ErrorCode::kNotFound);
  EXPECT_NE(gone.error().message.find("objects/ab/one"), std::string::npos) << gone.error().message;
}

TEST_F(S3ClientTest, MultipartUploadRoundTripsAndRangesReadAcrossParts) {
  S3Options options;
  options.part_size = 5ull << 20;
  options.multipart_threshold = 5ull << 20;
  Result<S3Client> client = store_.fresh_bucket(test_name(), options);
  ASSERT_TRUE(client) << client.error().message;
  std::vector<uint8_t> bytes = random_bytes((12ull << 20) + 123, 7);
  uint64_t reported = 0;
  ASSERT_TRUE(client->put("big", bytes, [&](uint64_t sent) { reported = sent; }));
  EXPECT_EQ(reported, bytes.size());
  EXPECT_GE(client->counters().requests, 5u) << "initiate, three parts, complete";

  Result<std::vector<uint8_t>> back = client->get("big", bytes.size());
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_TRUE(*back == bytes);
  std::vector<uint8_t> range(1 << 20);
  uint64_t offset = (5ull << 20) - 1000;  // Across the first part's end.
  ASSERT_TRUE(client->get_range("big", offset, range));
  EXPECT_TRUE(std::equal(range.begin(), range.end(), bytes.begin() + static_cast<ptrdiff_t>(offset)));
  // No parts are left behind as objects of their own.
  Result<std::vector<std::pair<std::string, uint64_t>>> listed = client->list("");
  ASSERT_TRUE(listed);
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].second, bytes.size());
}

TEST_F(S3ClientTest, ObjectsLargerThanExpectedAreRefusedUnread) {
  Result<S3Client> client = store_.fresh_bucket(test_name());
  ASSERT_TRUE(client) << client.error().message;
  std::vector<uint8_t> bytes = random_bytes(1 << 20, 3);
  ASSERT_TRUE(client->put("large", bytes));
  Result<std::vector<uint8_t>> refused = client->get("large", 4096);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, ErrorCode::kCorruption);
  EXPECT_NE(refused.error().message.find("larger than the 4096 bytes"), std::string::npos) << refused.error().message;
  std::vector<uint8_t> past_end(16);
  EXPECT_FALSE(client->get_range("large", bytes.size() + 10, past_end)) << "a range past the end";
}

TEST_F(S3ClientTest, WrongSecretIsRefusedWithoutShowingIt) {
  Result<S3Client> good = store_.fresh_bucket(test_name());
  ASSERT_TRUE(good) << good.error().message;
  S3Credentials wrong = store_.credentials;
  wrong.secret_access_key = "not-the-secret-0123456789";
  Result<S3Client> client = S3Client::open(good->bucket(), wrong);
  ASSERT_TRUE(client);
  Status put = client->put("x", bytes_of("x"));
  ASSERT_FALSE(put);
  EXPECT_EQ(put.error().code, ErrorCode::kInvalidArgument);
  EXPECT_NE(put.error().message.find("SignatureDoesNotMatch"), std::string::npos) << put.error().message;
  EXPECT_EQ(put.error().message.find(wrong.secret_access_key), std::string::npos) << put.error().message;
  EXPECT_EQ(put.error().message.find(store_.credentials.secret_access_key), std::string::npos);
  EXPECT_EQ(client->counters().retries, 0u) << "a refusal is not retried";
}

TEST_F(S3ClientTest, AnEndpointThatIsDownFailsAfterItsRetries) {
  S3Options options;
  options.attempts = 3;
  options.first_backoff = std::chrono::milliseconds(10);
  // Port 1 on loopback: nothing listens, the connection is refused at once.
  Result<S3Client> client =
      S3Client::open({.endpoint = "http://127.0.0.1:1", .name = "down"}, store_.credentials, options);
  ASSERT_TRUE(client);
  Result<std::optional<uint64_t>> head = client->head("x");
  ASSERT_FALSE(head);
  EXPECT_EQ(head.error().code, ErrorCode::kIo);
  EXPECT_NE(head.error().message.find("after 3 tries"), std::string::npos) << head.error().message;
  EXPECT_NE(head.error().message.find("127.0.0.1:1"), std::string::npos) << head.error().message;
  EXPECT_EQ(client->counters().retries, 2u);
}

TEST_F(S3ClientTest, BadEndpointsAndBucketNamesAreRefusedByName) {
  Result<S3Client> no_scheme = S3Client::open({.endpoint = "127.0.0.1:9000", .name = "fine"}, store_.credentials);
  ASSERT_FALSE(no_scheme);
  EXPECT_NE(no_scheme.error().message.find("endpoint 127.0.0.1:9000"), std::string::npos);
  Result<S3Client> bad_bucket = S3Client::open({.endpoint = store_.endpoint, .name = "Bad_Name"}, store_.credentials);
  ASSERT_FALSE(bad_bucket);
  EXPECT_NE(bad_bucket.error().message.find("Bad_Name"), std::string::npos) << bad_bucket.error().message;
}

TEST(S3Credentials, FromTheEnvironmentElseTheCredentialsFile) {
  std::filesystem::path file = std::filesystem::path(::testing::TempDir()) / "deltavm-credentials";
  std::ofstream(file) << "[default]\naws_access_key_id = from-file\n\n[other]\n aws_access_key_id=other-id \n"
                         "aws_secret_access_key = other-secret\n";
  ::setenv("AWS_SHARED_CREDENTIALS_FILE", file.c_str(), 1);
  ::setenv("AWS_ACCESS_KEY_ID", "env-id", 1);
  ::setenv("AWS_SECRET_ACCESS_KEY", "env-secret", 1);
  Result<S3Credentials> from_env = S3Credentials::from_environment();
  ASSERT_TRUE(from_env);
  EXPECT_EQ(from_env->access_key_id, "env-id");
  ::unsetenv("AWS_ACCESS_KEY_ID");
  ::unsetenv("AWS_SECRET_ACCESS_KEY");
  ::setenv("AWS_PROFILE", "other", 1);
  Result<S3Credentials> from_file = S3Credentials::from_environment();
  ASSERT_TRUE(from_file) << from_file.error().message;
  EXPECT_EQ(from_file->access_key_id, "other-id");
  EXPECT_EQ(from_file->secret_access_key, "other-secret");
  ::unsetenv("AWS_PROFILE");
  Result<S3Credentials> incomplete = S3Credentials::from_environment();
  ASSERT_FALSE(incomplete);
  EXPECT_NE(incomplete.error().message.find("[default]"), std::string::npos) << incomplete.error().message;
  EXPECT_NE(incomplete.error().message.find(file.string()), std::string::npos);
  // A credentials file larger than any real one is refused before it is read.
  std::ofstream(file) << std::string(2 << 20, '#');
  Result<S3Credentials> huge = S3Credentials::from_environment();
  ASSERT_FALSE(huge);
  EXPECT_NE(huge.error().message.find("at most"), std::string::npos) << huge.error().message;
  ::unsetenv("AWS_SHARED_CREDENTIALS_FILE");
  std::filesystem::remove(file);
}

}  // namespace
}  // namespace deltavm
