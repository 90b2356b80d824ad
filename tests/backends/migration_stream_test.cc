// Stripping guest RAM pages out of QEMU's migration stream: streams written here in QEMU 7.2's
// layout (the real QEMU's streams are exercised by the snapshot tests).
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "backends/qemu/migration_stream.h"
#include "base/page.h"

namespace deltavm {
namespace {

class StreamWriter {
 public:
  StreamWriter& u8(uint8_t v) {
    bytes.push_back(v);
    return *this;
  }
  StreamWriter& be32(uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) bytes.push_back(static_cast<uint8_t>(v >> shift));
    return *this;
  }
  StreamWriter& be64(uint64_t v) { return be32(static_cast<uint32_t>(v >> 32)).be32(static_cast<uint32_t>(v)); }
  StreamWriter& name(const std::string& text) {
    u8(static_cast<uint8_t>(text.size()));
    bytes.insert(bytes.end(), text.begin(), text.end());
    return *this;
  }
  StreamWriter& page(uint8_t value) {
    bytes.insert(bytes.end(), kPageSize, value);
    return *this;
  }
  std::vector<uint8_t> bytes;
};

constexpr uint64_t kRamBytes = 4 * kPageSize;

// Header and configuration (with x-ignore-shared), as QEMU writes them.
StreamWriter header() {
  StreamWriter w;
  w.be32(0x5145564d).be32(3);
  w.u8(0x07).be32(13);
  for (char c : std::string("pc-i440fx-7.2")) w.u8(static_cast<uint8_t>(c));
  w.u8(0x05).name("configuration/capabilities").be32(1).be32(1).name("x-ignore-shared");
  return w;
}

// A stream whose "ram" block has pages 0 (0xaa) and 2 (zero) and whose "pc.rom" block has one
// page; then a device section and the end.
std::vector<uint8_t> sample_stream(std::vector<uint8_t>* expected_stripped) {
  StreamWriter w = header();
  StreamWriter kept = header();
  auto both = [&](auto&& write) {
    write(w);
    write(kept);
  };
  both([](StreamWriter& s) {
    s.u8(0x01).be32(2).name("ram").be32(0).be32(4);
    s.be64((kRamBytes + kPageSize) | 0x04)
        .name("ram")
        .be64(kRamBytes)
        .be64(0)
        .name("pc.rom")
        .be64(kPageSize)
        .be64(0xc0000);
    s.be64(0x10).u8(0x7e).be32(2);
    s.u8(0x02).be32(2);
  });
  w.be64(0x08).name("ram").page(0xaa);
  w.be64(2 * kPageSize | 0x02 | 0x20).u8(0);
  both([](StreamWriter& s) { s.be64(0x08).name("pc.rom").page(0x55); });
  both([](StreamWriter& s) { s.be64(0x10).u8(0x7e).be32(2); });
  both([](StreamWriter& s) { s.u8(0x03).be32(2); });
  w.be64(kPageSize | 0x08).name("ram").page(0x11);
  w.be64(3 * kPageSize | 0x02 | 0x20).u8(0);
  both([](StreamWriter& s) {
    s.be64(0x10).u8(0x7e).be32(2);
    s.u8(0x04).be32(3).name("cpu").be32(0).be32(1).u8(1).u8(2).u8(3).u8(0x7e).be32(3).u8(0x00);
  });
  if (expected_stripped) *expected_stripped = kept.bytes;
  return w.bytes;
}

TEST(MigrationStream, StripsTheBlocksPagesAndKeepsEverythingElse) {
  std::vector<uint8_t> expected;
  std::vector<uint8_t> stream = sample_stream(&expected);
  std::map<uint64_t, int> pages;
  Result<std::vector<uint8_t>> stripped =
      strip_ram_pages(stream, "ram", kRamBytes, 1 << 20, [&](const StreamPage& page) -> Status {
        pages[page.offset] = page.bytes ? page.bytes[0] : -1 - page.fill;
        return {};
      });
  ASSERT_TRUE(stripped) << stripped.error().message;
  EXPECT_EQ(*stripped, expected);
  EXPECT_EQ(pages, (std::map<uint64_t, int>{{0, 0xaa}, {kPageSize, 0x11}, {2 * kPageSize, -1}, {3 * kPageSize, -1}}));
}

TEST(MigrationStream, EveryTruncationIsAnErrorNamingTheStream) {
  std::vector<uint8_t> stream = sample_stream(nullptr);
  // Cut anywhere before the devices' sections: the reader must stop at the cut, cleanly.
  size_t devices = stream.size() - 24;
  for (size_t cut = 0; cut < devices; cut += (cut < 200 ? 1 : 97)) {
    std::span<const uint8_t> part(stream.data(), cut);
    Result<std::vector<uint8_t>> stripped =
        strip_ram_pages(part, "ram", kRamBytes, 1 << 20, [](const StreamPage&) -> Status { return {}; });
    ASSERT_FALSE(stripped) << "cut at " << cut;
    EXPECT_NE(stripped.error().message.find("migration stream"), std::string::npos) << stripped.error().message;
  }
}

TEST(MigrationStream, RefusesWhatItCannotRead) {
  auto strip = [](const std::vector<uint8_t>& stream, uint64_t ram_bytes = kRamBytes) {
    return strip_ram_pages(stream, "ram", ram_bytes, 1 << 20, [](const StreamPage&) -> Status { return {}; });
  };
  std::vector<uint8_t> good = sample_stream(nullptr);
  ASSERT_TRUE(strip(good));

  std::vector<uint8_t> bad_magic = good;
  bad_magic[0] = 'X';
  EXPECT_NE(strip(bad_magic).error().message.find("magic"), std::string::npos);

  // The VM's RAM is another size than the stream's block.
  EXPECT_NE(strip(good, 8 * kPageSize).error().message.find("RAM block \"ram\" of 16384 bytes"), std::string::npos);

  // A record flag deltavm does not read (XBZRLE).
  StreamWriter xbzrle = header();
  xbzrle.u8(0x01).be32(2).name("ram").be32(0).be32(4).be64(kRamBytes | 0x04).name("ram").be64(kRamBytes).be64(0);
  xbzrle.be64(0x40).name("ram");
  EXPECT_NE(strip(xbzrle.bytes).error().message.find("flags 0x40"), std::string::npos);

  // A page beyond its block.
  StreamWriter beyond = header();
  beyond.u8(0x01).be32(2).name("ram").be32(0).be32(4).be64(kRamBytes | 0x04).name("ram").be64(kRamBytes).be64(0);
  beyond.be64(kRamBytes | 0x08).name("ram").page(1);
  EXPECT_NE(strip(beyond.bytes).error().message.find("beyond RAM block"), std::string::npos);

  // Another iterative section (block migration).
  StreamWriter block = header();
  block.u8(0x01).be32(2).name("block").be32(0).be32(1);
  EXPECT_NE(strip(block.bytes).error().message.find("iterative section \"block\""), std::string::npos);

  // A stream whose state alone is over the limit.
  Result<std::vector<uint8_t>> limited =
      strip_ram_pages(good, "ram", kRamBytes, 64, [](const StreamPage&) -> Status { return {}; });
  ASSERT_FALSE(limited);
  EXPECT_EQ(limited.error().code, ErrorCode::kInvalidArgument);
}

}  // namespace
}  // namespace deltavm
