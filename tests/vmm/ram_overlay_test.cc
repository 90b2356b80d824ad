// The overlay file a kvm restore gets from the loader: written, reopened, checked; no KVM needed.
#include "vmm/ram_overlay.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <vector>

namespace deltavm::vmm {
namespace {

std::filesystem::path scratch(const char* name) {
  std::filesystem::path path = std::filesystem::path(::testing::TempDir()) / name;
  std::filesystem::remove(path);
  return path;
}

TEST(RamOverlay, PagesComeBackSortedWithTheirLastBytes) {
  std::filesystem::path path = scratch("overlay-pages");
  Result<RamOverlayWriter> writer = RamOverlayWriter::create(path);
  ASSERT_TRUE(writer);
  std::vector<uint8_t> a(4096, 'a'), b(4096, 'b'), c(4096, 'c');
  ASSERT_TRUE(writer->write_page(7, a.data()));
  ASSERT_TRUE(writer->write_page(2, b.data()));
  ASSERT_TRUE(writer->write_page(7, c.data()));  // Written again: the last bytes win.
  ASSERT_TRUE(writer->commit());
  Result<RamOverlay> overlay = RamOverlay::open(path, 16);
  ASSERT_TRUE(overlay) << overlay.error().message;
  ASSERT_EQ(overlay->page_count(), 2u);
  EXPECT_EQ(overlay->pages()[0], 2u);
  EXPECT_EQ(overlay->pages()[1], 7u);
  EXPECT_EQ(overlay->find(7)[0], 'c');
  EXPECT_EQ(overlay->find(2)[4095], 'b');
  EXPECT_EQ(overlay->find(3), nullptr);
}

TEST(RamOverlay, EmptyOverlayOfABaseOnlyChainOpens) {
  std::filesystem::path path = scratch("overlay-empty");
  Result<RamOverlayWriter> writer = RamOverlayWriter::create(path);
  ASSERT_TRUE(writer);
  ASSERT_TRUE(writer->commit());
  Result<RamOverlay> overlay = RamOverlay::open(path, 16);
  ASSERT_TRUE(overlay) << overlay.error().message;
  EXPECT_EQ(overlay->page_count(), 0u);
}

TEST(RamOverlay, RefusesPagesOutsideTheMachinesRam) {
  std::filesystem::path path = scratch("overlay-range");
  Result<RamOverlayWriter> writer = RamOverlayWriter::create(path);
  ASSERT_TRUE(writer);
  std::vector<uint8_t> page(4096, 1);
  ASSERT_TRUE(writer->write_page(100, page.data()));
  ASSERT_TRUE(writer->commit());
  Result<RamOverlay> overlay = RamOverlay::open(path, 16);
  ASSERT_FALSE(overlay);
  EXPECT_NE(overlay.error().message.find("out of order or range"), std::string::npos) << overlay.error().message;
}

}  // namespace
}  // namespace deltavm::vmm
