#include "image/delta_file.h"

#include <gtest/gtest.h>

#include <xxhash.h>

#include <cstring>

#include "base/coding.h"
#include "base/file.h"
#include "image/test_images.h"

namespace deltavm {
namespace {

struct Pair {
  std::vector<uint8_t> base, target;
  Delta delta;
  std::vector<uint8_t> encoded;
};

Pair make_pair(uint64_t pages, uint64_t seed) {
  std::mt19937_64 random(seed);
  Pair pair;
  pair.base = testing::random_image(pages, random);
  pair.target = testing::mutate_image(pair.base, 0.4, random);
  pair.delta = *diff(pair.base, pair.target);
  pair.encoded = encode_delta(pair.delta);
  return pair;
}

TEST(DeltaFile, RoundTripsEveryField) {
  Pair pair = make_pair(64, 1);
  Result<Delta> decoded = decode_delta(pair.encoded, "test");
  ASSERT_TRUE(decoded) << decoded.error().message;
  EXPECT_EQ(decoded->image_size_bytes, pair.delta.image_size_bytes);
  EXPECT_EQ(decoded->base_digest, pair.delta.base_digest);
  EXPECT_EQ(decoded->target_digest, pair.delta.target_digest);
  ASSERT_EQ(decoded->edits.size(), pair.delta.edits.size());
  EXPECT_EQ(decoded->data, pair.delta.data);
  std::vector<uint8_t> memory = pair.base;
  ASSERT_TRUE(apply_delta(*decoded, memory));
  EXPECT_EQ(memory, pair.target);
}

TEST(DeltaFile, RoundTripsADeltaWithoutDigests) {
  Pair pair = make_pair(16, 2);
  pair.delta.base_digest.reset();
  pair.delta.target_digest.reset();
  Result<Delta> decoded = decode_delta(encode_delta(pair.delta), "test");
  ASSERT_TRUE(decoded);
  EXPECT_FALSE(decoded->base_digest.has_value());
  EXPECT_FALSE(decoded->target_digest.has_value());
}

TEST(DeltaFile, RoundTripsAnEmptyDelta) {
  std::vector<uint8_t> image(8 * kPageSize, 7);
  Delta delta = *diff(image, image);
  Result<Delta> decoded = decode_delta(encode_delta(delta), "empty");
  ASSERT_TRUE(decoded) << decoded.error().message;
  EXPECT_TRUE(decoded->edits.empty());
}

TEST(DeltaFile, RefusesEverySingleByteFlip) {
  Pair pair = make_pair(12, 3);
  ASSERT_GT(pair.encoded.size(), kDeltaHeaderBytes + 2 * kDeltaSectionHeaderBytes);
  for (size_t position = 0; position < pair.encoded.size(); ++position) {
    for (uint8_t mask : {uint8_t{0x01}, uint8_t{0x80}}) {
      std::vector<uint8_t> corrupt = pair.encoded;
      corrupt[position] ^= mask;
      Result<Delta> decoded = decode_delta(corrupt, "flipped");
      ASSERT_FALSE(decoded) << "flip of byte " << position << " was accepted";
      EXPECT_TRUE(decoded.error().code == ErrorCode::kCorruption || decoded.error().code == ErrorCode::kUnsupported)
          << decoded.error().message;
    }
  }
}

TEST(DeltaFile, RefusesEveryTruncation) {
  Pair pair = make_pair(12, 4);
  for (size_t length = 0; length < pair.encoded.size(); ++length) {
    std::span<const uint8_t> cut(pair.encoded.data(), length);
    Result<Delta> decoded = decode_delta(cut, "cut");
    ASSERT_FALSE(decoded) << "delta cut to " << length << " bytes was accepted";
    EXPECT_EQ(decoded.error().code, ErrorCode::kCorruption);
  }
}

TEST(DeltaFile, RefusesTrailingBytes) {
  Pair pair = make_pair(8, 5);
  pair.encoded.push_back(0);
  Result<Delta> decoded = decode_delta(pair.encoded, "long");
  ASSERT_FALSE(decoded);
  EXPECT_NE(decoded.error().message.find("after the last section"), std::string::npos);
}

TEST(DeltaFile, NamesTheFileAndTheFailedCheck) {
  Pair pair = make_pair(8, 6);
  pair.encoded[0] = 'X';
  Result<Delta> bad_magic = decode_delta(pair.encoded, "images/x.dvd");
  ASSERT_FALSE(bad_magic);
  EXPECT_EQ(bad_magic.error().message, "images/x.dvd: bad magic: not a deltavm delta file");
}

// A file whose checksums are all valid but whose content breaks a rule: the decoder must check
// meaning, not only checksums.
std::vector<uint8_t> encode_unchecked(const Delta& delta) { return encode_delta(delta); }

TEST(DeltaFile, RefusesAPageIndexPastTheImage) {
  Delta delta;
  delta.image_size_bytes = 4 * kPageSize;
  delta.edits.push_back(PageEdit{4, PageEncoding::kZero, 0, 0, 0});
  Result<Delta> decoded = decode_delta(encode_unchecked(delta), "crafted");
  ASSERT_FALSE(decoded);
  EXPECT_NE(decoded.error().message.find("past the end of the image"), std::string::npos);
}

TEST(DeltaFile, RefusesARunPastTheEndOfThePage) {
  Delta delta;
  delta.image_size_bytes = 4 * kPageSize;
  delta.runs.push_back(PageRun{4090, 7});
  delta.data.resize(7);
  delta.edits.push_back(PageEdit{1, PageEncoding::kRuns, 1, 0, 0});
  Result<Delta> decoded = decode_delta(encode_unchecked(delta), "crafted");
  ASSERT_FALSE(decoded);
  EXPECT_NE(decoded.error().message.find("past the end of the page"), std::string::npos);
}

TEST(DeltaFile, RefusesDataThatNoEditUses) {
  Delta delta;
  delta.image_size_bytes = 4 * kPageSize;
  delta.runs.push_back(PageRun{0, 5});
  delta.edits.push_back(PageEdit{1, PageEncoding::kRuns, 1, 0, 0});
  delta.data.resize(10);  // Within the data section's bound; the run uses 5 of the 10 bytes.
  Result<Delta> decoded = decode_delta(encode_unchecked(delta), "crafted");
  ASSERT_FALSE(decoded);
  EXPECT_NE(decoded.error().message.find("data section has 5 bytes no edit uses"), std::string::npos)
      << decoded.error().message;
}

TEST(DeltaFile, RefusesAWholePageWithoutItsBytes) {
  Delta delta;
  delta.image_size_bytes = 4 * kPageSize;
  delta.edits.push_back(PageEdit{0, PageEncoding::kFull, 0, 0, 0});
  delta.data.resize(kPageSize - 1);
  Result<Delta> decoded = decode_delta(encode_unchecked(delta), "crafted");
  ASSERT_FALSE(decoded);
  EXPECT_NE(decoded.error().message.find("past the end of the data section"), std::string::npos);
}

// Rewrites one header field and re-seals the header checksum, as a buggy or hostile writer would.
void reseal_header(std::vector<uint8_t>& bytes) {
  std::vector<uint8_t> sealed(bytes.begin(), bytes.begin() + 88);
  uint64_t checksum = XXH3_64bits(sealed.data(), sealed.size());
  for (int i = 0; i < 8; ++i) bytes[88 + i] = static_cast<uint8_t>(checksum >> (8 * i));
}

TEST(DeltaFile, RefusesANewerVersionAsUnsupported) {
  Pair pair = make_pair(4, 7);
  pair.encoded[8] = 2;
  reseal_header(pair.encoded);
  Result<Delta> decoded = decode_delta(pair.encoded, "future");
  ASSERT_FALSE(decoded);
  EXPECT_EQ(decoded.error().code, ErrorCode::kUnsupported);
}

TEST(DeltaFile, RefusesAnEditCountLargerThanThePageCount) {
  Pair pair = make_pair(4, 8);
  pair.encoded[24] = 5;  // edit_count 5 for a 4-page image.
  for (int i = 25; i < 32; ++i) pair.encoded[i] = 0;
  reseal_header(pair.encoded);
  Result<Delta> decoded = decode_delta(pair.encoded, "crafted");
  ASSERT_FALSE(decoded);
  EXPECT_NE(decoded.error().message.find("edit_count"), std::string::npos);
}

// The probe's 176-byte file: a header claiming a 1 TiB image with every page changed, and two
// empty sections. Sizing anything by the claimed count would ask for gigabytes.
TEST(DeltaFile, RefusesAnEditCountTheEditsSectionCannotHold) {
  std::vector<uint8_t> file = testing::craft_delta_file(kMaxImageSizeBytes, kMaxImageSizeBytes / kPageSize, {}, {});
  ASSERT_EQ(file.size(), 176u);
  Result<Delta> decoded = decode_delta(file, "tiny.dvd");
  ASSERT_FALSE(decoded);
  EXPECT_EQ(decoded.error().code, ErrorCode::kCorruption);
  EXPECT_NE(decoded.error().message.find("edit_count 268435456 needs at least"), std::string::npos)
      << decoded.error().message;
}

TEST(DeltaFile, RefusesAnImageSizeAboveTheLargestImage) {
  std::vector<uint8_t> file = testing::craft_delta_file(kMaxImageSizeBytes + kPageSize, 0, {}, {});
  Result<Delta> decoded = decode_delta(file, "huge.dvd");
  ASSERT_FALSE(decoded);
  EXPECT_NE(decoded.error().message.find("image_size_bytes"), std::string::npos) << decoded.error().message;
}

// A frame of a few bytes that claims 1 GiB or 64 GiB: refused from its own size, before any
// memory is sized by the claim.
TEST(DeltaFile, RefusesAZstdFrameClaimingMoreThanItCanHold) {
  for (uint64_t claimed : {1ull << 30, 64ull << 30}) {
    testing::CraftedSection edits{1, claimed, testing::zstd_frame_claiming(claimed, 1 << 17)};
    std::vector<uint8_t> file = testing::craft_delta_file(kMaxImageSizeBytes, claimed / 1024, edits, {});
    Result<Delta> decoded = decode_delta(file, "claims.dvd");
    ASSERT_FALSE(decoded) << claimed;
    EXPECT_NE(decoded.error().message.find("zstd frame cannot hold"), std::string::npos) << decoded.error().message;
  }
}

TEST(DeltaFile, RefusesAZstdFrameThatEndsBeforeItsClaim) {
  // 200 KiB claimed; one 128 KiB block held: possible by size, short in fact.
  testing::CraftedSection edits{1, 200 << 10, testing::zstd_frame_claiming(200 << 10, 1 << 17)};
  std::vector<uint8_t> file = testing::craft_delta_file(kMaxImageSizeBytes, 1000, edits, {});
  Result<Delta> decoded = decode_delta(file, "short.dvd");
  ASSERT_FALSE(decoded);
  EXPECT_EQ(decoded.error().code, ErrorCode::kCorruption);
}

TEST(DeltaFile, CompressesAgainstAReferenceAndNeedsItToDecode) {
  std::mt19937_64 random(10);
  std::vector<uint8_t> reference_bytes(32 * kPageSize);  // Incompressible on its own.
  for (uint8_t& byte : reference_bytes) byte = static_cast<uint8_t>(random());
  // A target that repeats the reference (as a base image repeats its kernel).
  std::vector<uint8_t> base(64 * kPageSize, 0);
  std::vector<uint8_t> target = base;
  std::copy(reference_bytes.begin(), reference_bytes.end(), target.begin() + 16 * kPageSize);
  Delta delta = *diff(base, target);
  CompressionReference reference = CompressionReference::of(reference_bytes);
  std::vector<uint8_t> plain = encode_delta(delta);
  std::vector<uint8_t> referenced = encode_delta(delta, kDefaultDeltaCompressionLevel, &reference);
  EXPECT_LT(referenced.size() * 4, plain.size());

  Result<Delta> decoded = decode_delta(referenced, "ref", &reference);
  ASSERT_TRUE(decoded) << decoded.error().message;
  EXPECT_EQ(decoded->data, delta.data);
  Result<std::optional<ImageDigest>> needed = delta_reference(referenced, "ref");
  ASSERT_TRUE(needed);
  EXPECT_EQ(**needed, reference.digest);

  Result<Delta> without = decode_delta(referenced, "ref");
  ASSERT_FALSE(without);
  EXPECT_NE(without.error().message.find("which was not given"), std::string::npos);
  std::vector<uint8_t> other_bytes = reference_bytes;
  other_bytes[5] ^= 1;
  CompressionReference other = CompressionReference::of(other_bytes);
  Result<Delta> wrong = decode_delta(referenced, "ref", &other);
  ASSERT_FALSE(wrong);
  EXPECT_NE(wrong.error().message.find("given reference"), std::string::npos);
}

TEST(DeltaFile, WritesAtomicallyAndReadsBack) {
  Pair pair = make_pair(16, 9);
  std::filesystem::path directory = std::filesystem::path(::testing::TempDir()) / "delta_file_test";
  std::filesystem::create_directories(directory);
  std::filesystem::path path = directory / "x.dvd";
  ASSERT_TRUE(write_delta_file(path, pair.delta));
  Result<Delta> read = read_delta_file(path);
  ASSERT_TRUE(read);
  EXPECT_EQ(read->data, pair.delta.data);
  for (const auto& entry : std::filesystem::directory_iterator(directory)) {
    EXPECT_EQ(entry.path().filename().string().find(kTemporaryMarker), std::string::npos) << entry.path();
  }
  std::filesystem::remove_all(directory);
}

}  // namespace
}  // namespace deltavm
