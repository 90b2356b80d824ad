// Push and pull between two stores through a real object store (Swift's s3api): only what a
// side lacks moves, every object and image is verified, and hostile remotes are refused.
#include "store/remote.h"

#include <gtest/gtest.h>

#include <random>
#include <thread>

#include "image/test_images.h"
#include "support/fault_proxy.h"
#include "support/object_store.h"

namespace deltavm {
namespace {

constexpr uint64_t kPages = 1024;  // 4 MiB images.

std::filesystem::path fresh_directory(const std::string& name) {
  std::filesystem::path directory = std::filesystem::path(::testing::TempDir()) / "deltavm_remote_test" / name;
  std::filesystem::remove_all(directory);
  std::filesystem::create_directories(directory.parent_path());
  return directory;
}

uint64_t object_files(const Store& store) {
  uint64_t count = 0;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(store.directory() / "objects")) {
    if (entry.is_regular_file()) ++count;
  }
  return count;
}

class RemoteTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<TestObjectStore> located = TestObjectStore::locate();
    ASSERT_TRUE(located) << located.error().message;
    object_store_ = *located;
    std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    Result<S3Client> bucket = object_store_.fresh_bucket(name);
    ASSERT_TRUE(bucket) << bucket.error().message;
    bucket_name_ = bucket->bucket().name;
    Result<Store> a = Store::open_or_create(fresh_directory(name + "-a"));
    Result<Store> b = Store::open_or_create(fresh_directory(name + "-b"));
    ASSERT_TRUE(a && b);
    host_a_.emplace(std::move(*a));
    host_b_.emplace(std::move(*b));
    // base <- web <- worker, with an attachment (a machine state) on each.
    std::mt19937_64 random(42);
    images_.push_back(testing::random_image(kPages, random));
    images_.push_back(testing::mutate_image(images_[0], 0.05, random));
    images_.push_back(testing::mutate_image(images_[1], 0.02, random));
    const char* names[] = {"base", "web", "worker"};
    for (size_t i = 0; i < images_.size(); ++i) {
      std::string state = fmt::format("machine state of {}", names[i]);
      PutOptions options;
      options.attachments = {{"state", {reinterpret_cast<const uint8_t*>(state.data()), state.size()}}};
      options.metadata = fmt::format(R"({{"image": "{}"}})", names[i]);
      std::optional<std::string> parent = i == 0 ? std::nullopt : std::optional<std::string>(names[i - 1]);
      ASSERT_TRUE(host_a_->put_image(names[i], images_[i], parent, options));
    }
  }

  Remote remote_of(Store& store, S3Options options = {}) {
    RemoteRecord record{"origin", fmt::format("s3://{}/hosts", bucket_name_), object_store_.endpoint, "us-east-1"};
    Result<Remote> remote = Remote::open(record, object_store_.credentials, options);
    EXPECT_TRUE(remote) << remote.error().message;
    (void)store;
    return std::move(*remote);
  }

  TestObjectStore object_store_;
  std::string bucket_name_;
  std::optional<Store> host_a_, host_b_;
  std::vector<std::vector<uint8_t>> images_;
};

TEST_F(RemoteTest, PushSendsWhatTheRemoteLacksAndPullRebuildsTheSameImages) {
  Remote remote = remote_of(*host_a_);
  Result<PushReport> pushed = remote.push(*host_a_, "worker");
  ASSERT_TRUE(pushed) << pushed.error().message;
  EXPECT_EQ(pushed->objects_sent, 6u) << "three deltas and three states";
  EXPECT_EQ(pushed->manifests, (std::vector<std::string>{"base", "web", "worker"}));
  Result<PushReport> again = remote.push(*host_a_, "worker");
  ASSERT_TRUE(again) << again.error().message;
  EXPECT_EQ(again->objects_sent, 0u);
  EXPECT_EQ(again->objects_present, 6u);

  Result<std::vector<std::string>> listed = remote.images();
  ASSERT_TRUE(listed) << listed.error().message;
  EXPECT_EQ(*listed, (std::vector<std::string>{"base", "web", "worker"}));

  Result<PullReport> pulled = remote.pull(*host_b_, "worker");
  ASSERT_TRUE(pulled) << pulled.error().message;
  EXPECT_EQ(pulled->import.added, (std::vector<std::string>{"base", "web", "worker"}));
  EXPECT_EQ(pulled->import.objects_fetched, 6u);
  for (const char* name : {"base", "web", "worker"}) {
    Result<Mapping> rebuilt = host_b_->get_image(name);
    ASSERT_TRUE(rebuilt) << rebuilt.error().message;
    Result<ImageRecord> a = host_a_->find(name);
    Result<ImageRecord> b = host_b_->find(name);
    ASSERT_TRUE(a && b);
    EXPECT_EQ(a->digest, b->digest);
    EXPECT_EQ(a->metadata, b->metadata);
    EXPECT_EQ(a->page_sample, b->page_sample);
    Result<std::vector<uint8_t>> state = host_b_->read_attachment(*b, "state");
    ASSERT_TRUE(state);
    EXPECT_EQ(std::string(state->begin(), state->end()), fmt::format("machine state of {}", name));
  }
  Result<Mapping> worker = host_b_->get_image("worker");
  ASSERT_TRUE(worker);
  EXPECT_TRUE(std::equal(images_[2].begin(), images_[2].end(), worker->data()));
  Result<FsckReport> fsck = host_b_->fsck();
  ASSERT_TRUE(fsck);
  EXPECT_TRUE(fsck->clean());

  Result<PullReport> nothing = remote.pull(*host_b_, "worker");
  ASSERT_TRUE(nothing) << nothing.error().message;
  EXPECT_TRUE(nothing->import.added.empty());
  EXPECT_EQ(nothing->import.objects_fetched, 0u);
}

TEST_F(RemoteTest, AHostHoldingTheBaseFetchesOnlyTheChildren) {
  Remote remote = remote_of(*host_a_);
  ASSERT_TRUE(remote.push(*host_a_, "worker"));
  ASSERT_TRUE(remote.pull(*host_b_, "base"));
  Result<PullReport> pulled = remote.pull(*host_b_, "worker");
  ASSERT_TRUE(pulled) << pulled.error().message;
  EXPECT_EQ(pulled->import.present, (std::vector<std::string>{"base"}));
  EXPECT_EQ(pulled->import.objects_fetched, 4u);
  Result<ImageRecord> base = host_a_->find("base");
  Result<ImageRecord> web = host_a_->find("web");
  Result<ImageRecord> worker = host_a_->find("worker");
  ASSERT_TRUE(base && web && worker);
  EXPECT_LT(pulled->import.bytes_fetched, base->stored_size_bytes)
      << "the children's deltas are smaller than the base's";
  EXPECT_EQ(pulled->import.bytes_fetched, web->stored_size_bytes + worker->stored_size_bytes +
                                              web->attachments[0].size_bytes + worker->attachments[0].size_bytes);
}

TEST_F(RemoteTest, ADamagedRemoteObjectIsRefusedAndNothingIsRecorded) {
  Remote remote = remote_of(*host_a_);
  ASSERT_TRUE(remote.push(*host_a_, "worker"));
  Result<ImageRecord> web = host_a_->find("web");
  ASSERT_TRUE(web);
  // The remote's copy of web's delta: one byte flipped.
  std::string hex = web->object_id.hex();
  std::string key = fmt::format("hosts/objects/{}/{}", hex.substr(0, 2), hex);
  Result<std::vector<uint8_t>> bytes = remote.client().get(key, web->stored_size_bytes);
  ASSERT_TRUE(bytes);
  (*bytes)[bytes->size() / 2] ^= 0x40;
  ASSERT_TRUE(remote.client().put(key, *bytes));

  Result<PullReport> pulled = remote.pull(*host_b_, "worker");
  ASSERT_FALSE(pulled);
  EXPECT_EQ(pulled.error().code, ErrorCode::kCorruption);
  EXPECT_NE(pulled.error().message.find(hex), std::string::npos) << pulled.error().message;
  Result<std::vector<ImageRecord>> records = host_b_->list();
  ASSERT_TRUE(records);
  EXPECT_TRUE(records->empty()) << "no image of the chain is recorded";
  EXPECT_FALSE(std::filesystem::exists(host_b_->object_path(web->object_id))) << "the damaged bytes were not kept";
}

TEST_F(RemoteTest, ManifestsThatLieAreRefused) {
  Remote remote = remote_of(*host_a_);
  ASSERT_TRUE(remote.push(*host_a_, "worker"));
  Result<std::vector<ImageRecord>> chain = host_a_->chain("worker");
  ASSERT_TRUE(chain);

  // Damaged in transit or at rest: the checksum catches it.
  std::string manifest = encode_manifest(*chain);
  std::string damaged = manifest;
  damaged[damaged.find("\"web\"") + 1] = 'W';
  Result<std::vector<ImageRecord>> decoded =
      decode_manifest({reinterpret_cast<const uint8_t*>(damaged.data()), damaged.size()}, "worker");
  ASSERT_FALSE(decoded);
  EXPECT_NE(decoded.error().message.find("checksum"), std::string::npos) << decoded.error().message;

  // Written by someone who recomputed the checksum: worker claims web's digest. The rebuild
  // finds out, and nothing is recorded.
  std::vector<ImageRecord> lying = *chain;
  lying[2].digest = lying[1].digest;
  std::string forged = encode_manifest(lying);
  ASSERT_TRUE(remote.client().put("hosts/templates/worker.json",
                                  {reinterpret_cast<const uint8_t*>(forged.data()), forged.size()}));
  Result<PullReport> pulled = remote.pull(*host_b_, "worker");
  ASSERT_FALSE(pulled);
  EXPECT_EQ(pulled.error().code, ErrorCode::kCorruption);
  EXPECT_NE(pulled.error().message.find("rebuilt image has digest"), std::string::npos) << pulled.error().message;
  Result<std::vector<ImageRecord>> records = host_b_->list();
  ASSERT_TRUE(records);
  EXPECT_TRUE(records->empty());

  // The manifest of another image under this name.
  std::string web_manifest = encode_manifest({(*chain)[0], (*chain)[1]});
  Result<std::vector<ImageRecord>> other =
      decode_manifest({reinterpret_cast<const uint8_t*>(web_manifest.data()), web_manifest.size()}, "worker");
  ASSERT_FALSE(other);
  EXPECT_NE(other.error().message.find("manifest of \"web\""), std::string::npos) << other.error().message;
}

TEST_F(RemoteTest, AnImageOfTheSameNameButOtherBytesIsAConflict) {
  Remote remote = remote_of(*host_a_);
  ASSERT_TRUE(remote.push(*host_a_, "worker"));
  std::mt19937_64 random(7);
  ASSERT_TRUE(host_b_->put_image("base", testing::random_image(kPages, random), std::nullopt));
  Result<PullReport> pulled = remote.pull(*host_b_, "worker");
  ASSERT_FALSE(pulled);
  EXPECT_EQ(pulled.error().code, ErrorCode::kConflict);
  EXPECT_NE(pulled.error().message.find("image base here"), std::string::npos) << pulled.error().message;
}

TEST_F(RemoteTest, TwoPullsAtOnceStoreEachObjectOnce) {
  Remote remote = remote_of(*host_a_);
  ASSERT_TRUE(remote.push(*host_a_, "worker"));
  std::vector<Result<PullReport>> results;
  results.reserve(2);
  for (int i = 0; i < 2; ++i) results.emplace_back(make_error(ErrorCode::kIo, "not run"));
  std::vector<std::thread> pullers;
  pullers.reserve(2);
  for (int i = 0; i < 2; ++i) {
    pullers.emplace_back([&, i] {
      Result<Store> store = Store::open(host_b_->directory());  // A store of its own, as another process has.
      if (!store) return;
      Remote own = remote_of(*store);
      results[i] = own.pull(*store, "worker");
    });
  }
  for (std::thread& puller : pullers) puller.join();
  for (const Result<PullReport>& result : results) ASSERT_TRUE(result) << result.error().message;
  Result<std::vector<ImageRecord>> records = host_b_->list();
  ASSERT_TRUE(records);
  EXPECT_EQ(records->size(), 3u);
  EXPECT_EQ(object_files(*host_b_), 6u);
  EXPECT_EQ(results[0]->import.added.size() + results[1]->import.added.size(), 3u)
      << "each image is recorded by one of the two";
}

uint16_t port_of(const std::string& endpoint) {
  return static_cast<uint16_t>(std::stoi(endpoint.substr(endpoint.rfind(':') + 1)));
}

TEST_F(RemoteTest, BurstsOf503AndConnectionsCutMidObjectAreRetried) {
  Remote direct = remote_of(*host_a_);
  ASSERT_TRUE(direct.push(*host_a_, "worker"));
  Result<std::unique_ptr<testing::FaultProxy>> proxy = testing::FaultProxy::start(port_of(object_store_.endpoint));
  ASSERT_TRUE(proxy) << proxy.error().message;
  RemoteRecord record{"origin", fmt::format("s3://{}/hosts", bucket_name_), (*proxy)->endpoint(), "us-east-1"};

  (*proxy)->fail_next_connections(3);
  Result<Remote> remote = Remote::open(record, object_store_.credentials);
  ASSERT_TRUE(remote);
  Result<PullReport> pulled = remote->pull(*host_b_, "worker");
  ASSERT_TRUE(pulled) << pulled.error().message;
  EXPECT_EQ(remote->client().counters().retries, 3u);
  EXPECT_EQ((*proxy)->faults_injected(), 3);

  // A connection dies 64 KiB into an answer (the base's object is the one that large): curl
  // sees a short body, the client tries again on a new connection. Into a third store, which
  // lacks everything.
  Result<ImageRecord> base = host_a_->find("base");
  ASSERT_TRUE(base);
  ASSERT_GT(base->stored_size_bytes, 128u << 10) << "the cut must land inside an object";
  Result<Store> host_c = Store::open_or_create(fresh_directory("cut-c"));
  ASSERT_TRUE(host_c);
  (*proxy)->cut_a_connection_after(64 << 10);
  Result<Remote> fresh = Remote::open(record, object_store_.credentials);  // New connections.
  ASSERT_TRUE(fresh);
  Result<PullReport> again = fresh->pull(*host_c, "worker");
  ASSERT_TRUE(again) << again.error().message;
  EXPECT_GE(fresh->client().counters().retries, 1u);
  EXPECT_EQ((*proxy)->faults_injected(), 4);
  for (Store* store : {&*host_b_, &*host_c}) {
    Result<Mapping> image = store->get_image("worker");
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_TRUE(std::equal(images_[2].begin(), images_[2].end(), image->data()));
  }
}

TEST_F(RemoteTest, AStoreThatKeepsFailingGetsAClearErrorAndNothingIsKept) {
  Remote direct = remote_of(*host_a_);
  ASSERT_TRUE(direct.push(*host_a_, "worker"));
  Result<std::unique_ptr<testing::FaultProxy>> proxy = testing::FaultProxy::start(port_of(object_store_.endpoint));
  ASSERT_TRUE(proxy) << proxy.error().message;
  S3Options options;
  options.attempts = 3;
  options.first_backoff = std::chrono::milliseconds(10);
  RemoteRecord record{"origin", fmt::format("s3://{}/hosts", bucket_name_), (*proxy)->endpoint(), "us-east-1"};
  (*proxy)->fail_next_connections(1000);
  Result<Remote> remote = Remote::open(record, object_store_.credentials, options);
  ASSERT_TRUE(remote);
  Result<PullReport> pulled = remote->pull(*host_b_, "worker");
  ASSERT_FALSE(pulled);
  EXPECT_EQ(pulled.error().code, ErrorCode::kIo);
  EXPECT_NE(pulled.error().message.find("503"), std::string::npos) << pulled.error().message;
  EXPECT_NE(pulled.error().message.find("after 3 tries"), std::string::npos) << pulled.error().message;
  Result<std::vector<ImageRecord>> records = host_b_->list();
  ASSERT_TRUE(records);
  EXPECT_TRUE(records->empty());
  EXPECT_EQ(object_files(*host_b_), 0u);
}

TEST_F(RemoteTest, TheCacheEvictsOnlyWhatNothingNeedsLeastRecentlyUsedFirst) {
  Remote remote = remote_of(*host_a_);
  std::mt19937_64 random(9);
  ASSERT_TRUE(host_a_->put_image("other", testing::mutate_image(images_[0], 0.05, random), "base"));
  ASSERT_TRUE(remote.push(*host_a_, "worker"));
  ASSERT_TRUE(remote.push(*host_a_, "other"));
  ASSERT_TRUE(remote.pull(*host_b_, "worker"));
  ASSERT_TRUE(remote.pull(*host_b_, "other"));
  Result<std::vector<CachedImage>> cached = host_b_->cached_images();
  ASSERT_TRUE(cached);
  ASSERT_EQ(cached->size(), 4u);
  for (const CachedImage& image : *cached) EXPECT_EQ(image.remote, "origin");
  Result<uint64_t> bytes = host_b_->cached_bytes();
  ASSERT_TRUE(bytes);

  // No limit, or one above what is cached: nothing goes.
  Result<EvictReport> none = host_b_->evict_cached({});
  ASSERT_TRUE(none);
  EXPECT_TRUE(none->evicted.empty());
  ASSERT_TRUE(host_b_->set_cache_limit(*bytes));
  none = host_b_->evict_cached({});
  ASSERT_TRUE(none);
  EXPECT_TRUE(none->evicted.empty());

  // One byte less: one leaf goes, the least recently used (a tie: by name), and only its
  // objects with it.
  ASSERT_TRUE(host_b_->set_cache_limit(*bytes - 1));
  Result<EvictReport> one = host_b_->evict_cached({});
  ASSERT_TRUE(one) << one.error().message;
  EXPECT_EQ(one->evicted, (std::vector<std::string>{"other"}));
  EXPECT_GT(one->collected.objects_removed, 0u);
  EXPECT_TRUE(host_b_->get_image("worker")) << "what stays is whole";

  // A limit of zero: a pinned image (a running VM's) and its chain stay; an image made here
  // keeps its chain too.
  ASSERT_TRUE(host_b_->set_cache_limit(0));
  Result<EvictReport> pinned = host_b_->evict_cached({"web"});
  ASSERT_TRUE(pinned) << pinned.error().message;
  EXPECT_EQ(pinned->evicted, (std::vector<std::string>{"worker"}));
  ASSERT_TRUE(host_b_->put_image("mine", testing::mutate_image(images_[1], 0.01, random), "web"));
  Result<EvictReport> kept = host_b_->evict_cached({});
  ASSERT_TRUE(kept) << kept.error().message;
  EXPECT_TRUE(kept->evicted.empty()) << "base and web carry an image made here";
  Result<FsckReport> fsck = host_b_->fsck();
  ASSERT_TRUE(fsck);
  EXPECT_TRUE(fsck->clean());
  EXPECT_TRUE(fsck->unreferenced.empty()) << "eviction collects what it frees";

  // What was evicted comes back with a pull.
  ASSERT_TRUE(host_b_->set_cache_limit(std::nullopt));
  Result<PullReport> again = remote.pull(*host_b_, "worker");
  ASSERT_TRUE(again) << again.error().message;
  EXPECT_EQ(again->import.added, (std::vector<std::string>{"worker"}));
  Result<Mapping> worker = host_b_->get_image("worker");
  ASSERT_TRUE(worker);
  EXPECT_TRUE(std::equal(images_[2].begin(), images_[2].end(), worker->data()));
}

TEST_F(RemoteTest, PullOfAnImageTheRemoteLacksNamesIt) {
  Remote remote = remote_of(*host_a_);
  Result<PullReport> pulled = remote.pull(*host_b_, "nosuch");
  ASSERT_FALSE(pulled);
  EXPECT_EQ(pulled.error().code, ErrorCode::kNotFound);
  EXPECT_NE(pulled.error().message.find("has no image nosuch"), std::string::npos) << pulled.error().message;
}

TEST(RemoteRecords, UrlsNamesAndEndpointsAreChecked) {
  EXPECT_TRUE(make_remote_record("origin", "s3://bucket/some/prefix/", "http://127.0.0.1:9000", "us-east-1"));
  Result<RemoteUrl> url = RemoteUrl::parse("s3://bucket/some/prefix/");
  ASSERT_TRUE(url);
  EXPECT_EQ(url->bucket, "bucket");
  EXPECT_EQ(url->key("objects/x"), "some/prefix/objects/x");
  for (const char* bad : {"http://bucket", "s3://", "s3://bucket/a/../b", "s3://bucket//a", "s3://bucket/a b"}) {
    Result<RemoteRecord> refused = make_remote_record("origin", bad, "http://127.0.0.1:9000", "us-east-1");
    ASSERT_FALSE(refused) << bad;
    EXPECT_EQ(refused.error().code, ErrorCode::kInvalidArgument);
  }
  EXPECT_FALSE(make_remote_record("or igin", "s3://bucket", "http://127.0.0.1:9000", "us-east-1"));
  EXPECT_FALSE(make_remote_record("origin", "s3://bucket", "ftp://127.0.0.1", "us-east-1"));
  EXPECT_FALSE(make_remote_record("origin", "s3://Bucket_", "http://127.0.0.1", "us-east-1"));
}

}  // namespace
}  // namespace deltavm
