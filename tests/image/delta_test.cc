#include "image/delta.h"

#include <gtest/gtest.h>

#include <cstring>

#include "base/file.h"
#include "image/test_images.h"

namespace deltavm {
namespace {

std::vector<uint8_t> applied(const std::vector<uint8_t>& base, std::initializer_list<const Delta*> deltas) {
  std::vector<uint8_t> memory = base;
  for (const Delta* delta : deltas) {
    Status status = apply_delta(*delta, memory);
    EXPECT_TRUE(status) << status.error().message;
  }
  return memory;
}

TEST(Delta, ApplyOfDiffReproducesTargetOnRandomImages) {
  std::mt19937_64 random(1);
  for (int trial = 0; trial < 20; ++trial) {
    auto base = testing::random_image(64, random);
    auto target = testing::mutate_image(base, 0.3, random);
    Result<Delta> delta = diff(base, target);
    ASSERT_TRUE(delta) << delta.error().message;
    EXPECT_EQ(applied(base, {&*delta}), target) << "trial " << trial;
  }
}

TEST(Delta, EqualImagesGiveAnEmptyDelta) {
  std::mt19937_64 random(2);
  auto image = testing::random_image(32, random);
  Result<Delta> delta = diff(image, image);
  ASSERT_TRUE(delta);
  EXPECT_TRUE(delta->edits.empty());
  EXPECT_TRUE(delta->data.empty());
  EXPECT_EQ(delta->base_digest, delta->target_digest);
}

TEST(Delta, ChoosesTheSmallestEncodingPerPage) {
  std::vector<uint8_t> base(4 * kPageSize, 0xAA);
  std::vector<uint8_t> target = base;
  std::fill_n(target.begin() + 1 * kPageSize, kPageSize, 0);  // Page 1 becomes zero.
  target[2 * kPageSize + 100] = 1;                            // Page 2: one byte.
  for (size_t i = 0; i < kPageSize; ++i) target[3 * kPageSize + i] = static_cast<uint8_t>(i * 7);  // Page 3: all.
  Result<Delta> delta = diff(base, target);
  ASSERT_TRUE(delta);
  ASSERT_EQ(delta->edits.size(), 3u);
  EXPECT_EQ(delta->edits[0].page_index, 1u);
  EXPECT_EQ(delta->edits[0].encoding, PageEncoding::kZero);
  EXPECT_EQ(delta->edits[1].page_index, 2u);
  EXPECT_EQ(delta->edits[1].encoding, PageEncoding::kRuns);
  ASSERT_EQ(delta->edits[1].run_count, 1u);
  EXPECT_EQ(delta->runs[delta->edits[1].first_run].offset, 100);
  EXPECT_EQ(delta->runs[delta->edits[1].first_run].length, 1);
  EXPECT_EQ(delta->edits[2].encoding, PageEncoding::kFull);
  EXPECT_EQ(delta->data.size(), 1u + kPageSize);
}

TEST(Delta, MergesRunsSeparatedByShortGaps) {
  std::vector<uint8_t> base(kPageSize, 0x11), target = base;
  target[10] = 0;  // Gap of 2 equal bytes (11, 12): merged into one run 10..13.
  target[13] = 0;
  target[100] = 0;  // Far away: its own run.
  Result<Delta> delta = diff(base, target);
  ASSERT_TRUE(delta);
  ASSERT_EQ(delta->runs.size(), 2u);
  EXPECT_EQ(delta->runs[0].offset, 10);
  EXPECT_EQ(delta->runs[0].length, 4);
  EXPECT_EQ(delta->runs[1].offset, 100);
  EXPECT_EQ(applied(base, {&*delta}), target);
}

TEST(Delta, RunsAtTheLastBytesOfTheLastPage) {
  std::vector<uint8_t> base(2 * kPageSize, 0x11), target = base;
  target.back() = 0x12;
  target[target.size() - 9] = 0x12;
  Result<Delta> delta = diff(base, target);
  ASSERT_TRUE(delta);
  EXPECT_EQ(applied(base, {&*delta}), target);
}

TEST(Delta, RefusesImagesOfDifferentSizes) {
  std::vector<uint8_t> base(2 * kPageSize), target(3 * kPageSize);
  Result<Delta> delta = diff(base, target);
  ASSERT_FALSE(delta);
  EXPECT_EQ(delta.error().code, ErrorCode::kInvalidArgument);
  EXPECT_NE(delta.error().message.find("same size"), std::string::npos);
}

TEST(Delta, RefusesImagesThatAreNotWholePages) {
  std::vector<uint8_t> base(kPageSize + 1), target(kPageSize + 1);
  Result<Delta> delta = diff(base, target);
  ASSERT_FALSE(delta);
  EXPECT_NE(delta.error().message.find("whole number"), std::string::npos);
}

TEST(Delta, ApplyRefusesMemoryOfTheWrongSize) {
  std::vector<uint8_t> base(2 * kPageSize), target(2 * kPageSize, 1);
  Result<Delta> delta = diff(base, target);
  ASSERT_TRUE(delta);
  std::vector<uint8_t> memory(kPageSize);
  Status status = apply_delta(*delta, memory);
  ASSERT_FALSE(status);
  EXPECT_EQ(memory, std::vector<uint8_t>(kPageSize));  // Untouched.
}

TEST(Delta, DirtyDiffComparesOnlyDirtyPages) {
  std::mt19937_64 random(3);
  auto base = testing::random_image(64, random);
  auto target = testing::mutate_image(base, 0.5, random);
  DirtyBitmap dirty(64);
  for (uint64_t page = 0; page < 64; ++page) {
    if (std::memcmp(base.data() + page * kPageSize, target.data() + page * kPageSize, kPageSize) != 0) dirty.set(page);
  }
  // A change outside the bitmap is, by contract, not looked at.
  DirtyBitmap partial = dirty;
  std::vector<uint8_t> target_with_hidden_change = target;
  uint64_t hidden_page = 0;
  while (dirty.test(hidden_page)) ++hidden_page;
  target_with_hidden_change[hidden_page * kPageSize] ^= 0xFF;

  DiffOptions options;
  options.dirty = &partial;
  Result<Delta> delta = diff(base, target_with_hidden_change, options);
  ASSERT_TRUE(delta);
  EXPECT_EQ(applied(base, {&*delta}), target);
  // The digests still cover every page, so verifying the result against them catches the
  // change the bitmap missed.
  ASSERT_TRUE(delta->target_digest.has_value());
  EXPECT_EQ(*delta->target_digest, digest_image(target_with_hidden_change));
  EXPECT_NE(*delta->target_digest, digest_image(applied(base, {&*delta})));
  Result<Delta> full = diff(base, target);
  ASSERT_TRUE(full);
  EXPECT_EQ(delta->edits.size(), full->edits.size());
}

TEST(Delta, DirtyDiffRefusesABitmapOfTheWrongSize) {
  std::vector<uint8_t> image(4 * kPageSize);
  DirtyBitmap dirty(5);
  DiffOptions options;
  options.dirty = &dirty;
  Result<Delta> delta = diff(image, image, options);
  ASSERT_FALSE(delta);
  EXPECT_NE(delta.error().message.find("dirty bitmap"), std::string::npos);
}

TEST(Delta, SquashEqualsSequentialApplyOnRandomImages) {
  std::mt19937_64 random(4);
  for (int trial = 0; trial < 30; ++trial) {
    auto a = testing::random_image(48, random);
    auto b = testing::mutate_image(a, 0.4, random);
    auto c = testing::mutate_image(b, 0.4, random);
    Result<Delta> ab = diff(a, b), bc = diff(b, c);
    ASSERT_TRUE(ab && bc);
    Result<Delta> ac = squash(*ab, *bc);
    ASSERT_TRUE(ac) << ac.error().message;
    EXPECT_EQ(applied(a, {&*ac}), c) << "trial " << trial;
    EXPECT_EQ(applied(a, {&*ac}), applied(a, {&*ab, &*bc}));
    EXPECT_EQ(ac->base_digest, ab->base_digest);
    EXPECT_EQ(ac->target_digest, bc->target_digest);
  }
}

TEST(Delta, SquashIsAssociative) {
  std::mt19937_64 random(5);
  auto a = testing::random_image(32, random);
  auto b = testing::mutate_image(a, 0.5, random);
  auto c = testing::mutate_image(b, 0.5, random);
  auto d = testing::mutate_image(c, 0.5, random);
  Delta ab = *diff(a, b), bc = *diff(b, c), cd = *diff(c, d);
  Delta left = *squash(*squash(ab, bc), cd);
  Delta right = *squash(ab, *squash(bc, cd));
  EXPECT_EQ(applied(a, {&left}), d);
  EXPECT_EQ(applied(a, {&right}), d);
}

TEST(Delta, SquashRefusesDeltasThatDoNotChain) {
  std::mt19937_64 random(6);
  auto a = testing::random_image(8, random);
  auto b = testing::mutate_image(a, 0.5, random);
  auto c = testing::mutate_image(a, 0.5, random);
  Delta ab = *diff(a, b), ac = *diff(a, c);
  Result<Delta> wrong = squash(ab, ac);  // ac applies to a, not to b.
  ASSERT_FALSE(wrong);
  EXPECT_NE(wrong.error().message.find("applies to image"), std::string::npos);
}

class RealImages : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::getenv("DELTAVM_TEST_IMAGES") == nullptr) GTEST_SKIP() << "DELTAVM_TEST_IMAGES not set";
    auto directory = testing::real_image_directory();
    ASSERT_TRUE(directory) << "DELTAVM_TEST_IMAGES is set but guest-{0,1,2}.ram are missing";
    for (int i = 0; i < 3; ++i) {
      auto mapping = Mapping::map_file_readonly(*directory / ("guest-" + std::to_string(i) + ".ram"));
      ASSERT_TRUE(mapping);
      images_.push_back(std::move(*mapping));
    }
  }
  std::vector<Mapping> images_;
};

TEST_F(RealImages, ApplyOfDiffReproducesTarget) {
  Result<Delta> delta = diff(images_[0].bytes(), images_[1].bytes());
  ASSERT_TRUE(delta);
  EXPECT_GT(delta->edits.size(), 0u);
  auto memory = Mapping::map_anonymous(images_[0].size());
  ASSERT_TRUE(memory);
  std::memcpy(memory->writable_bytes().data(), images_[0].bytes().data(), images_[0].size());
  ASSERT_TRUE(apply_delta(*delta, memory->writable_bytes()));
  EXPECT_EQ(std::memcmp(memory->bytes().data(), images_[1].bytes().data(), images_[1].size()), 0);
  EXPECT_EQ(digest_image(memory->bytes()), *delta->target_digest);
}

TEST_F(RealImages, SquashEqualsSequentialApply) {
  Delta d01 = *diff(images_[0].bytes(), images_[1].bytes());
  Delta d12 = *diff(images_[1].bytes(), images_[2].bytes());
  Result<Delta> d02 = squash(d01, d12);
  ASSERT_TRUE(d02);
  auto memory = Mapping::map_anonymous(images_[0].size());
  ASSERT_TRUE(memory);
  std::memcpy(memory->writable_bytes().data(), images_[0].bytes().data(), images_[0].size());
  ASSERT_TRUE(apply_delta(*d02, memory->writable_bytes()));
  EXPECT_EQ(std::memcmp(memory->bytes().data(), images_[2].bytes().data(), images_[2].size()), 0);
}

TEST_F(RealImages, SubPageRunsDominate) {
  // nokaslr boots of one guest differ in few bytes of few pages (design.md §3): most changed
  // pages must be stored as runs, not whole pages.
  Delta delta = *diff(images_[0].bytes(), images_[1].bytes());
  DeltaStats stats = delta.stats();
  EXPECT_GT(stats.run_pages, 10 * stats.full_pages);
  EXPECT_LT(stats.data_bytes, delta.edits.size() * kPageSize / 2);
}

}  // namespace
}  // namespace deltavm
