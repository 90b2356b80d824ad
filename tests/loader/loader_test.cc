// The loader without any VM (host-only): a chain three deltas deep whose deltas change the
// same pages over and over (whole pages, runs, zeroing) is filled into RAM over the base flat
// file, and the RAM is the top image exactly; only the pages some delta changes are written.
#include "loader/loader.h"

#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <random>

#include "base/page.h"
#include "image/test_images.h"

namespace deltavm {
namespace {

// Collects the loader's page writes, as a backend's RAM would take them.
class RecordingWriter : public GuestMemoryWriter {
 public:
  Status write_pages(std::span<const PageWrite> pages) override {
    for (const PageWrite& page : pages) {
      if (page.guest_physical_address % kPageSize != 0) {
        return make_error(ErrorCode::kInvalidArgument, "unaligned write at {:#x}", page.guest_physical_address);
      }
      uint64_t index = page.guest_physical_address / kPageSize;
      if (written.count(index)) return make_error(ErrorCode::kInvalidArgument, "page {} written twice", index);
      written[index].assign(page.bytes, page.bytes + kPageSize);
    }
    return {};
  }
  std::map<uint64_t, std::vector<uint8_t>> written;
};

TEST(Loader, ThreeDeepChainWithOverlappingEditsFillsTheTopImageExactly) {
  std::filesystem::path directory = std::filesystem::path(::testing::TempDir()) / "loader_test";
  std::filesystem::remove_all(directory);
  Result<Store> store = Store::open_or_create(directory);
  ASSERT_TRUE(store) << store.error().message;
  std::mt19937_64 random(3);
  constexpr uint64_t kPages = 96;
  std::vector<std::vector<uint8_t>> images = {testing::random_image(kPages, random)};
  // Pages 10-19 change in every layer, each time differently: a whole page, a few runs, zeros.
  for (int layer = 1; layer <= 3; ++layer) {
    std::vector<uint8_t> next = testing::mutate_image(images.back(), 0.1, random);
    for (uint64_t page = 10; page < 20; ++page) {
      uint8_t* bytes = next.data() + page * kPageSize;
      switch ((page + layer) % 3) {
        case 0: std::memset(bytes, 0, kPageSize); break;
        case 1:
          for (size_t i = 0; i < kPageSize; i += 97) bytes[i] ^= static_cast<uint8_t>(layer * 31 + 1);
          break;
        default:
          for (size_t i = 0; i < kPageSize; ++i) bytes[i] = static_cast<uint8_t>(random());
          break;
      }
    }
    images.push_back(std::move(next));
  }
  std::optional<std::string> parent;
  for (size_t i = 0; i < images.size(); ++i) {
    std::string name = fmt::format("i{}", i);
    ASSERT_TRUE(store->put_image(name, images[i], parent));
    parent = name;
  }
  Result<std::vector<ImageRecord>> chain = store->chain("i3");
  ASSERT_TRUE(chain);
  ASSERT_EQ(chain->back().chain_depth, 3u);

  Loader loader(*store);
  Result<PreparedRam> ram = loader.prepare(*chain, RamStrategy::kBasePlusDeltas);
  ASSERT_TRUE(ram) << ram.error().message;
  RecordingWriter writer;
  ASSERT_TRUE(ram->fill(writer));
  Result<std::vector<uint8_t>> base = read_file(ram->flat_file());
  ASSERT_TRUE(base);
  ASSERT_EQ(*base, images[0]) << "the flat file is not the base";
  std::vector<uint8_t> memory = *base;
  for (const auto& [page, bytes] : writer.written)
    std::memcpy(memory.data() + page * kPageSize, bytes.data(), kPageSize);
  EXPECT_EQ(memory, images[3]);
  // Only pages some delta changes are written; every page that differs from the base is.
  for (uint64_t page = 0; page < kPages; ++page) {
    bool differs =
        std::memcmp(images[0].data() + page * kPageSize, images[3].data() + page * kPageSize, kPageSize) != 0;
    if (differs) EXPECT_TRUE(writer.written.count(page)) << "page " << page << " differs but was not written";
  }
  for (uint64_t page = 10; page < 20; ++page) EXPECT_TRUE(writer.written.count(page)) << page;
}

}  // namespace
}  // namespace deltavm
