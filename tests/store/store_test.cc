#include "store/store.h"

#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "image/test_images.h"

namespace deltavm {
namespace {

std::filesystem::path fresh_store_directory(const std::string& name) {
  std::filesystem::path directory = std::filesystem::path(::testing::TempDir()) / name;
  std::filesystem::remove_all(directory);
  return directory;
}

std::vector<uint8_t> bytes_of(const Mapping& mapping) {
  return std::vector<uint8_t>(mapping.bytes().begin(), mapping.bytes().end());
}

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    directory_ = fresh_store_directory(::testing::UnitTest::GetInstance()->current_test_info()->name());
    Result<Store> store = Store::open_or_create(directory_);
    ASSERT_TRUE(store) << store.error().message;
    store_.emplace(std::move(*store));
    std::mt19937_64 random(42);
    a_ = testing::random_image(64, random);
    b_ = testing::mutate_image(a_, 0.2, random);
    c_ = testing::mutate_image(b_, 0.2, random);
  }
  std::filesystem::path directory_;
  std::optional<Store> store_;
  std::vector<uint8_t> a_, b_, c_;
};

TEST_F(StoreTest, PutAndGetAChainOfThree) {
  ASSERT_TRUE(store_->put_image("a", a_, std::nullopt));
  Result<ImageRecord> b = store_->put_image("b", b_, std::string("a"));
  ASSERT_TRUE(b) << b.error().message;
  Result<ImageRecord> c = store_->put_image("c", c_, std::string("b"));
  ASSERT_TRUE(c);
  EXPECT_EQ(c->chain_depth, 2u);
  EXPECT_EQ(c->parent, "b");
  EXPECT_LT(c->stored_size_bytes, c_.size() / 4);
  Result<Mapping> image = store_->get_image("c");
  ASSERT_TRUE(image) << image.error().message;
  EXPECT_EQ(bytes_of(*image), c_);
  Result<std::vector<ImageRecord>> chain = store_->chain("c");
  ASSERT_TRUE(chain);
  ASSERT_EQ(chain->size(), 3u);
  EXPECT_EQ((*chain)[0].name, "a");
}

TEST_F(StoreTest, ObjectsAndFlatFilesAreReadOnlyFromBirth) {
  Result<ImageRecord> a = store_->put_image("a", a_, std::nullopt);
  ASSERT_TRUE(a) << a.error().message;
  Result<std::filesystem::path> flat = store_->flat_file(*a);
  ASSERT_TRUE(flat) << flat.error().message;
  for (const std::filesystem::path& path : {store_->object_path(a->object_id), *flat}) {
    struct stat st {};
    ASSERT_EQ(::stat(path.c_str(), &st), 0) << path;
    EXPECT_EQ(st.st_mode & 07777, 0444u) << path;
  }
}

TEST_F(StoreTest, CatalogPersistsAcrossOpens) {
  ASSERT_TRUE(store_->put_image("a", a_, std::nullopt));
  store_.reset();
  Result<Store> reopened = Store::open(directory_);
  ASSERT_TRUE(reopened);
  Result<Mapping> image = reopened->get_image("a");
  ASSERT_TRUE(image);
  EXPECT_EQ(bytes_of(*image), a_);
}

TEST_F(StoreTest, IdenticalContentIsStoredOnce) {
  ASSERT_TRUE(store_->put_image("a", a_, std::nullopt));
  ASSERT_TRUE(store_->put_image("a-again", a_, std::nullopt));
  Result<std::vector<ImageRecord>> records = store_->list();
  ASSERT_TRUE(records);
  ASSERT_EQ(records->size(), 2u);
  EXPECT_EQ((*records)[0].object_id, (*records)[1].object_id);
}

TEST_F(StoreTest, RefusesDuplicateNamesMissingParentsAndBadNames) {
  ASSERT_TRUE(store_->put_image("a", a_, std::nullopt));
  Result<ImageRecord> duplicate = store_->put_image("a", b_, std::nullopt);
  ASSERT_FALSE(duplicate);
  EXPECT_EQ(duplicate.error().code, ErrorCode::kAlreadyExists);
  Result<ImageRecord> orphan = store_->put_image("x", b_, std::string("nope"));
  ASSERT_FALSE(orphan);
  EXPECT_EQ(orphan.error().code, ErrorCode::kNotFound);
  Result<ImageRecord> bad = store_->put_image("a b", b_, std::nullopt);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, ErrorCode::kInvalidArgument);
}

TEST_F(StoreTest, CorruptObjectIsRefusedWithItsName) {
  ASSERT_TRUE(store_->put_image("a", a_, std::nullopt));
  ImageRecord record = *store_->find("a");
  std::filesystem::path path = store_->object_path(record.object_id);
  std::vector<uint8_t> bytes = *read_file(path);
  bytes[bytes.size() / 2] ^= 0x40;
  ASSERT_TRUE(write_file_atomic(path, bytes));
  Result<Mapping> image = store_->get_image("a");
  ASSERT_FALSE(image);
  EXPECT_EQ(image.error().code, ErrorCode::kCorruption);
  EXPECT_NE(image.error().message.find(record.object_id.hex()), std::string::npos);
  Result<FsckReport> report = store_->fsck();
  ASSERT_TRUE(report);
  EXPECT_FALSE(report->clean());
}

TEST_F(StoreTest, SharedDeltaIsOneCopyWhileHeldAndReadAgainOnceLetGo) {
  ASSERT_TRUE(store_->put_image("a", a_, std::nullopt));
  ASSERT_TRUE(store_->put_image("b", b_, std::string("a")));
  ImageRecord record = *store_->find("b");
  std::vector<std::shared_ptr<const Delta>> held(4);
  std::vector<std::thread> readers;
  for (auto& delta : held) {
    readers.emplace_back([&] {
      Result<std::shared_ptr<const Delta>> read = store_->read_delta_shared(record);
      if (read) delta = *read;
    });
  }
  for (std::thread& reader : readers) reader.join();
  for (const auto& delta : held) {
    ASSERT_NE(delta, nullptr);
    EXPECT_EQ(delta.get(), held[0].get());
  }
  EXPECT_EQ(held[0]->target_digest, record.digest);

  // Once nobody holds it, the next reader reads (and verifies) the object again.
  std::filesystem::path path = store_->object_path(record.object_id);
  std::vector<uint8_t> bytes = *read_file(path);
  bytes[bytes.size() / 2] ^= 0x40;
  ASSERT_TRUE(write_file_atomic(path, bytes));
  held.clear();
  Result<std::shared_ptr<const Delta>> again = store_->read_delta_shared(record);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, ErrorCode::kCorruption);
}

TEST_F(StoreTest, TruncatedObjectIsRefused) {
  ASSERT_TRUE(store_->put_image("a", a_, std::nullopt));
  ImageRecord record = *store_->find("a");
  std::filesystem::resize_file(store_->object_path(record.object_id), record.stored_size_bytes - 1);
  Result<Mapping> image = store_->get_image("a");
  ASSERT_FALSE(image);
  EXPECT_NE(image.error().message.find("size"), std::string::npos);
}

TEST_F(StoreTest, MissingObjectMakesFsckReportAProblem) {
  ASSERT_TRUE(store_->put_image("a", a_, std::nullopt));
  ImageRecord record = *store_->find("a");
  std::filesystem::remove(store_->object_path(record.object_id));
  Result<FsckReport> report = store_->fsck();
  ASSERT_TRUE(report);
  ASSERT_EQ(report->problems.size(), 1u);
  EXPECT_NE(report->problems[0].find("image a"), std::string::npos);
}

TEST_F(StoreTest, GcRemovesUnreferencedObjectsAndTemporariesOnly) {
  ASSERT_TRUE(store_->put_image("a", a_, std::nullopt));
  ASSERT_TRUE(store_->put_image("b", b_, std::string("a")));
  ASSERT_FALSE(store_->remove_image("a"));  // Parent of b.
  ASSERT_TRUE(store_->remove_image("b"));
  std::filesystem::path leftover = directory_ / "objects" / "ab" / "abc.tmp-1-2";
  std::filesystem::create_directories(leftover.parent_path());
  ASSERT_TRUE(write_file_atomic(leftover, std::vector<uint8_t>(10)));
  Result<FsckReport> before = store_->fsck();
  ASSERT_TRUE(before);
  EXPECT_TRUE(before->clean());
  EXPECT_EQ(before->unreferenced.size(), 1u);
  EXPECT_EQ(before->temporaries.size(), 1u);
  Result<GcReport> gc = store_->gc();
  ASSERT_TRUE(gc);
  EXPECT_EQ(gc->objects_removed, 1u);
  EXPECT_EQ(gc->temporaries_removed, 1u);
  Result<Mapping> a = store_->get_image("a");
  ASSERT_TRUE(a);
  EXPECT_EQ(bytes_of(*a), a_);
  Result<FsckReport> after = store_->fsck();
  ASSERT_TRUE(after);
  EXPECT_TRUE(after->clean());
  EXPECT_TRUE(after->unreferenced.empty());
}

// A store whose catalog is lost must be refused, never given a fresh, empty catalog that would
// make every object look unreferenced (the next gc would delete them all).
TEST_F(StoreTest, StoreWhoseCatalogWasDeletedIsRefusedAndKeepsItsObjects) {
  ASSERT_TRUE(store_->put_image("a", a_, std::nullopt));
  store_.reset();
  for (const char* file : {"catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm"}) {
    std::filesystem::remove(directory_ / file);
  }
  Result<Store> opened = Store::open(directory_);
  ASSERT_FALSE(opened);
  EXPECT_EQ(opened.error().code, ErrorCode::kCorruption);
  EXPECT_NE(opened.error().message.find("catalog.sqlite is missing"), std::string::npos) << opened.error().message;
  Result<Store> created = Store::open_or_create(directory_);
  ASSERT_FALSE(created);
  EXPECT_NE(created.error().message.find("refusing to start a new catalog"), std::string::npos)
      << created.error().message;
  EXPECT_FALSE(std::filesystem::exists(directory_ / "catalog.sqlite"));
  size_t objects = 0;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(directory_ / "objects")) {
    if (entry.is_regular_file()) ++objects;
  }
  EXPECT_GT(objects, 0u);
}

TEST_F(StoreTest, EmptyCatalogIsRefused) {
  ASSERT_TRUE(store_->put_image("a", a_, std::nullopt));
  store_.reset();
  std::filesystem::remove(directory_ / "catalog.sqlite-wal");
  std::filesystem::remove(directory_ / "catalog.sqlite-shm");
  std::filesystem::resize_file(directory_ / "catalog.sqlite", 0);
  for (auto open : {&Store::open, &Store::open_or_create}) {
    Result<Store> opened = open(directory_, {});
    ASSERT_FALSE(opened);
    EXPECT_EQ(opened.error().code, ErrorCode::kCorruption);
    EXPECT_NE(opened.error().message.find("is empty (0 bytes)"), std::string::npos) << opened.error().message;
  }
  EXPECT_EQ(std::filesystem::file_size(directory_ / "catalog.sqlite"), 0u);
}

TEST_F(StoreTest, UnreadableCatalogIsRefused) {
  ASSERT_TRUE(store_->put_image("a", a_, std::nullopt));
  store_.reset();
  std::filesystem::remove(directory_ / "catalog.sqlite-wal");
  std::filesystem::remove(directory_ / "catalog.sqlite-shm");
  std::string garbage(8192, 'x');
  ASSERT_TRUE(write_file_atomic(directory_ / "catalog.sqlite",
                                std::span(reinterpret_cast<const uint8_t*>(garbage.data()), garbage.size())));
  Result<Store> opened = Store::open(directory_);
  ASSERT_FALSE(opened);
  EXPECT_EQ(opened.error().code, ErrorCode::kCorruption);
  EXPECT_NE(opened.error().message.find("unreadable"), std::string::npos) << opened.error().message;
  EXPECT_NE(opened.error().message.find("catalog.sqlite"), std::string::npos) << opened.error().message;
}

TEST(StoreOpen, MissingDirectoryIsRefusedAndNotCreated) {
  std::filesystem::path directory = fresh_store_directory("no_such_store");
  Result<Store> opened = Store::open(directory);
  ASSERT_FALSE(opened);
  EXPECT_EQ(opened.error().code, ErrorCode::kNotFound);
  EXPECT_NE(opened.error().message.find("no store at"), std::string::npos) << opened.error().message;
  EXPECT_FALSE(std::filesystem::exists(directory));
  Result<Store> created = Store::open_or_create(directory);
  ASSERT_TRUE(created) << created.error().message;
  Result<Store> reopened = Store::open(directory);
  EXPECT_TRUE(reopened) << reopened.error().message;
}

// The flat file a VM maps is sealed when it is made; a changed one is never handed out: it is
// verified whole and rebuilt from the verified chain.
TEST_F(StoreTest, ChangedFlatFileIsRebuiltNotHandedOut) {
  Result<ImageRecord> a = store_->put_image("a", a_, std::nullopt);
  ASSERT_TRUE(a);
  Result<std::filesystem::path> path = store_->flat_file(*a);
  ASSERT_TRUE(path) << path.error().message;
  EXPECT_EQ(
      std::filesystem::status(*path).permissions() & std::filesystem::perms::all,
      std::filesystem::perms::owner_read | std::filesystem::perms::group_read | std::filesystem::perms::others_read);
  {
    Fd fd = std::move(*open_file(*path, O_WRONLY));
    const uint8_t bytes[4] = {0xde, 0xad, 0xbe, 0xef};
    ASSERT_EQ(::pwrite(fd.get(), bytes, sizeof bytes, 5 * kPageSize + 100), 4);
  }
  Result<FsckReport> fsck = store_->fsck();
  ASSERT_TRUE(fsck);
  ASSERT_FALSE(fsck->clean());
  EXPECT_NE(fsck->problems.front().find("the cached image is damaged"), std::string::npos) << fsck->problems.front();
  Result<std::filesystem::path> again = store_->flat_file(*a);
  ASSERT_TRUE(again) << again.error().message;
  Result<std::vector<uint8_t>> bytes = read_file(*again);
  ASSERT_TRUE(bytes);
  EXPECT_EQ(*bytes, a_);
  Result<FsckReport> after = store_->fsck();
  ASSERT_TRUE(after);
  EXPECT_TRUE(after->clean());
}

TEST_F(StoreTest, GcRemovesDamagedAndUnusedFlatFilesAndCacheTemporaries) {
  Result<ImageRecord> a = store_->put_image("a", a_, std::nullopt);
  Result<ImageRecord> b = store_->put_image("b", b_, std::nullopt);
  ASSERT_TRUE(a && b);
  Result<std::filesystem::path> a_path = store_->flat_file(*a);
  Result<std::filesystem::path> b_path = store_->flat_file(*b);
  ASSERT_TRUE(a_path && b_path);
  ASSERT_TRUE(store_->remove_image("b"));
  std::filesystem::path leftover = a_path->parent_path() / "x.ram.tmp-77-1";
  ASSERT_TRUE(write_file_atomic(leftover, std::vector<uint8_t>(10)));
  Result<FsckReport> fsck = store_->fsck();
  ASSERT_TRUE(fsck);
  EXPECT_TRUE(fsck->clean());
  EXPECT_EQ(fsck->unused_flat_files.size(), 1u);
  EXPECT_EQ(fsck->temporaries.size(), 1u);
  Result<GcReport> gc = store_->gc();
  ASSERT_TRUE(gc) << gc.error().message;
  EXPECT_EQ(gc->flat_files_removed, 1u);
  EXPECT_EQ(gc->temporaries_removed, 1u);
  EXPECT_TRUE(std::filesystem::exists(*a_path));
  EXPECT_FALSE(std::filesystem::exists(*b_path));
  EXPECT_FALSE(std::filesystem::exists(leftover));
}

TEST_F(StoreTest, ImageOfTheWrongSizeForItsParentIsRefused) {
  ASSERT_TRUE(store_->put_image("a", a_, std::nullopt));
  std::vector<uint8_t> small(kPageSize * 2);
  Result<ImageRecord> record = store_->put_image("small", small, std::string("a"));
  ASSERT_FALSE(record);
  EXPECT_NE(record.error().message.find("parent"), std::string::npos);
  EXPECT_FALSE(store_->find("small"));
}

TEST_F(StoreTest, ImageCompressedAgainstAnAttachmentRoundTripsAndNeedsIt) {
  // The attachment is what the image repeats (as a base image repeats its kernel).
  std::vector<uint8_t> attachment(a_.begin() + 8 * kPageSize, a_.begin() + 40 * kPageSize);
  PutOptions options;
  options.attachments = {{"kernel", attachment}};
  options.reference = {{"kernel", "raw"}};
  Result<ImageRecord> record = store_->put_image("a", a_, std::nullopt, options);
  ASSERT_TRUE(record) << record.error().message;
  EXPECT_EQ(record->reference, "kernel:raw");
  Result<Mapping> image = store_->get_image("a");
  ASSERT_TRUE(image) << image.error().message;
  EXPECT_EQ(bytes_of(*image), a_);
  Result<FsckReport> clean = store_->fsck();
  ASSERT_TRUE(clean);
  EXPECT_TRUE(clean->clean());

  // Damage the attachment: the image can no longer be read, and the error says why.
  std::filesystem::path path = store_->object_path(record->attachments[0].object_id);
  std::vector<uint8_t> bytes = *read_file(path);
  bytes[0] ^= 1;
  ASSERT_TRUE(write_file_atomic(path, bytes));
  Result<Store> reopened = Store::open(directory_);  // No reference cached from before.
  ASSERT_TRUE(reopened);
  Result<Mapping> broken = reopened->get_image("a");
  ASSERT_FALSE(broken);
  EXPECT_NE(broken.error().message.find("compression reference"), std::string::npos) << broken.error().message;
}

// Reference kinds come with each Store (no process-wide registry): a store opened without the
// kind an image was compressed through cannot read it, and says which kind it lacks.
TEST_F(StoreTest, ReferenceKindsComeWithTheStoreThatOpensIt) {
  ReferenceKinds reversed;
  reversed.emplace("reversed", [](std::span<const uint8_t> bytes) {
    return Result<std::vector<uint8_t>>(std::vector<uint8_t>(bytes.rbegin(), bytes.rend()));
  });
  store_.reset();
  Result<Store> with_kind = Store::open(directory_, reversed);
  ASSERT_TRUE(with_kind) << with_kind.error().message;
  std::vector<uint8_t> attachment(a_.rbegin() + 8 * kPageSize, a_.rbegin() + 40 * kPageSize);
  PutOptions options;
  options.attachments = {{"kernel", attachment}};
  options.reference = {{"kernel", "reversed"}};
  ASSERT_TRUE(with_kind->put_image("a", a_, std::nullopt, options));
  Result<Store> without_kind = Store::open(directory_);
  ASSERT_TRUE(without_kind);
  Result<Mapping> refused = without_kind->get_image("a");
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, ErrorCode::kUnsupported);
  EXPECT_NE(refused.error().message.find("reference kind reversed"), std::string::npos) << refused.error().message;
  Result<Mapping> image = with_kind->get_image("a");
  ASSERT_TRUE(image) << image.error().message;
  EXPECT_EQ(bytes_of(*image), a_);
}

TEST_F(StoreTest, UnknownReferenceKindIsRefusedAtPut) {
  std::vector<uint8_t> attachment(kPageSize, 1);
  PutOptions options;
  options.attachments = {{"kernel", attachment}};
  options.reference = {{"kernel", "no-such-kind"}};
  Result<ImageRecord> record = store_->put_image("a", a_, std::nullopt, options);
  ASSERT_FALSE(record);
  EXPECT_NE(record.error().message.find("no-such-kind"), std::string::npos);
  EXPECT_FALSE(store_->find("a"));
}

TEST(StoreRealImages, ChainOfRealGuestImagesIsSmallAndExact) {
  if (std::getenv("DELTAVM_TEST_IMAGES") == nullptr) GTEST_SKIP() << "DELTAVM_TEST_IMAGES not set";
  auto directory = testing::real_image_directory();
  ASSERT_TRUE(directory) << "DELTAVM_TEST_IMAGES is set but the images are missing";
  Result<Store> store = Store::open_or_create(fresh_store_directory("real_images_store"));
  ASSERT_TRUE(store);
  std::optional<std::string> parent;
  std::vector<Mapping> images;
  for (int i = 0; i < 3; ++i) {
    images.push_back(std::move(*Mapping::map_file_readonly(*directory / ("guest-" + std::to_string(i) + ".ram"))));
    std::string name = "guest-" + std::to_string(i);
    Result<ImageRecord> record = store->put_image(name, images.back().bytes(), parent);
    ASSERT_TRUE(record) << record.error().message;
    if (parent) {
      EXPECT_LT(record->stored_size_bytes, record->image_size_bytes / 50);
    }
    parent = name;
  }
  Result<Mapping> rebuilt = store->get_image("guest-2");
  ASSERT_TRUE(rebuilt);
  EXPECT_EQ(std::memcmp(rebuilt->bytes().data(), images[2].bytes().data(), images[2].size()), 0);
}

}  // namespace
}  // namespace deltavm
