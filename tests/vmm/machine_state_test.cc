// The kvm machine state format (host-only: the decoder needs no /dev/kvm): a state round-trips,
// and every damage is refused with an error naming it: bad magic, another version, a cut at
// any byte, a cut at every field (with the lengths and checksums made to agree), too many or no
// vCPUs.
#include "vmm/machine_state.h"

#include <gtest/gtest.h>
#include <xxhash.h>

#include <set>

#include "base/coding.h"

namespace deltavm::vmm {
namespace {

constexpr size_t kHeaderBytes = 36;

MachineState sample_state(uint32_t vcpus) {
  MachineState state;
  state.cpu_vendor = "AuthenticAMD";
  state.tsc_khz = 2'000'000;
  state.memory_bytes = 64 << 20;
  state.kind = GuestKind::kMicro;
  for (uint32_t i = 0; i < vcpus; ++i) {
    VcpuState vcpu;
    vcpu.regs.rip = 0x100000 + i;
    vcpu.xsave.assign(kXsaveBytes, static_cast<uint8_t>(i + 1));
    vcpu.tsc_khz = state.tsc_khz;
    vcpu.cpuid.resize(3);
    vcpu.cpuid[1].function = 7;
    vcpu.msrs.resize(2);
    vcpu.msrs[0].index = 0x10;
    state.vcpus.push_back(std::move(vcpu));
  }
  state.devices.assign(32, 0xab);
  return state;
}

// Replaces the payload of an encoded state and makes the header's length and checksums agree,
// as a buggy or hostile writer would: only the decoder's field checks stand in the way.
std::vector<uint8_t> with_payload(const std::vector<uint8_t>& encoded, std::span<const uint8_t> payload) {
  std::vector<uint8_t> out(encoded.begin(), encoded.begin() + 12);
  put_u64_le(out, payload.size());
  put_u64_le(out, XXH3_64bits(payload.data(), payload.size()));
  put_u64_le(out, XXH3_64bits(out.data(), out.size()));
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

void reseal_header(std::vector<uint8_t>& bytes) {
  uint64_t checksum = XXH3_64bits(bytes.data(), 28);
  for (int i = 0; i < 8; ++i) bytes[28 + i] = static_cast<uint8_t>(checksum >> (8 * i));
}

TEST(MachineStateFormat, RoundTrips) {
  std::vector<uint8_t> encoded = encode_machine_state(sample_state(2));
  Result<MachineState> decoded = decode_machine_state(encoded, "state");
  ASSERT_TRUE(decoded) << decoded.error().message;
  EXPECT_EQ(decoded->vcpus.size(), 2u);
  EXPECT_EQ(decoded->vcpus[1].regs.rip, 0x100001u);
  EXPECT_EQ(decoded->vcpus[1].cpuid[1].function, 7u);
  EXPECT_EQ(encode_machine_state(*decoded), encoded);
}

// Found by tests/fuzz/machine_state (corpus regression-empty-array): an array of no entries
// was copied from a null pointer, undefined behaviour that UBSan stops on.
TEST(MachineStateFormat, RoundTripsEmptyArrays) {
  MachineState state = sample_state(1);
  state.vcpus[0].cpuid.clear();
  state.vcpus[0].msrs.clear();
  std::vector<uint8_t> encoded = encode_machine_state(state);
  Result<MachineState> decoded = decode_machine_state(encoded, "state");
  ASSERT_TRUE(decoded) << decoded.error().message;
  EXPECT_TRUE(decoded->vcpus[0].cpuid.empty());
  EXPECT_TRUE(decoded->vcpus[0].msrs.empty());
  EXPECT_EQ(encode_machine_state(*decoded), encoded);
}

TEST(MachineStateFormat, RefusesBadMagic) {
  std::vector<uint8_t> encoded = encode_machine_state(sample_state(1));
  encoded[0] ^= 1;
  Result<MachineState> decoded = decode_machine_state(encoded, "state");
  ASSERT_FALSE(decoded);
  EXPECT_EQ(decoded.error().code, ErrorCode::kCorruption);
  EXPECT_NE(decoded.error().message.find("bad magic"), std::string::npos) << decoded.error().message;
}

TEST(MachineStateFormat, RefusesAnotherVersionAsUnsupported) {
  std::vector<uint8_t> encoded = encode_machine_state(sample_state(1));
  encoded[8] = 2;
  reseal_header(encoded);
  Result<MachineState> decoded = decode_machine_state(encoded, "state");
  ASSERT_FALSE(decoded);
  EXPECT_EQ(decoded.error().code, ErrorCode::kUnsupported);
  EXPECT_NE(decoded.error().message.find("version 2"), std::string::npos) << decoded.error().message;
}

TEST(MachineStateFormat, RefusesEveryTruncation) {
  std::vector<uint8_t> encoded = encode_machine_state(sample_state(1));
  for (size_t length = 0; length < encoded.size(); ++length) {
    Result<MachineState> decoded = decode_machine_state(std::span(encoded).first(length), "state");
    ASSERT_FALSE(decoded) << "a state cut to " << length << " bytes was accepted";
  }
}

// The payload cut at every byte, with the header made to agree: the field reader must name the
// field it ran out in, for every field.
TEST(MachineStateFormat, NamesTheFieldAtEveryCut) {
  std::vector<uint8_t> encoded = encode_machine_state(sample_state(1));
  std::span<const uint8_t> payload = std::span(encoded).subspan(kHeaderBytes);
  std::set<std::string> fields;
  for (size_t length = 0; length < payload.size(); ++length) {
    Result<MachineState> decoded = decode_machine_state(with_payload(encoded, payload.first(length)), "state");
    ASSERT_FALSE(decoded) << "a payload cut to " << length << " bytes was accepted";
    EXPECT_EQ(decoded.error().code, ErrorCode::kCorruption) << decoded.error().message;
    const std::string& message = decoded.error().message;
    size_t at = message.find("truncated at field ");
    ASSERT_NE(at, std::string::npos) << message;
    fields.insert(message.substr(at + 19, message.find(' ', at + 19) - at - 19));
  }
  for (const char* field :
       {"cpu_vendor", "tsc_khz", "memory_bytes", "kind", "vcpu_count", "mp_state", "regs", "sregs", "xsave", "xcrs",
        "debugregs", "lapic", "cpuid", "msrs", "events", "pit", "clock", "irqchip", "devices"}) {
    EXPECT_TRUE(fields.count(field)) << "no cut was reported in field " << field;
  }
}

TEST(MachineStateFormat, RefusesTooManyOrNoVcpus) {
  std::vector<uint8_t> encoded = encode_machine_state(sample_state(1));
  std::vector<uint8_t> payload(encoded.begin() + kHeaderBytes, encoded.end());
  // vcpu_count follows cpu_vendor (u64 length + 12 bytes), tsc_khz u32, memory_bytes u64, kind u32.
  size_t offset = 8 + 12 + 4 + 8 + 4;
  ASSERT_EQ(get_u32_le(payload.data() + offset), 1u);
  for (uint32_t count : {0u, 65u, 0xffffffffu}) {
    std::vector<uint8_t> changed = payload;
    for (int i = 0; i < 4; ++i) changed[offset + i] = static_cast<uint8_t>(count >> (8 * i));
    Result<MachineState> decoded = decode_machine_state(with_payload(encoded, changed), "state");
    ASSERT_FALSE(decoded) << count;
    EXPECT_NE(decoded.error().message.find(fmt::format("{} vCPUs", count)), std::string::npos)
        << decoded.error().message;
  }
}

TEST(MachineStateFormat, RefusesTrailingBytes) {
  std::vector<uint8_t> encoded = encode_machine_state(sample_state(1));
  std::vector<uint8_t> payload(encoded.begin() + kHeaderBytes, encoded.end());
  payload.push_back(0);
  Result<MachineState> decoded = decode_machine_state(with_payload(encoded, payload), "state");
  ASSERT_FALSE(decoded);
  EXPECT_NE(decoded.error().message.find("1 bytes after the last field"), std::string::npos) << decoded.error().message;
}

}  // namespace
}  // namespace deltavm::vmm
