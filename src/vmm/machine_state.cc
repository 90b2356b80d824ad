#include "vmm/machine_state.h"

#include <xxhash.h>

#include <cstring>

#include "base/coding.h"

namespace deltavm::vmm {
namespace {

constexpr char kMagic[8] = {'D', 'V', 'M', 'S', 'T', 'A', 'T', 'E'};
constexpr uint32_t kVersion = 1;
// magic, version u32, payload length u64, payload checksum u64, header checksum u64.
constexpr size_t kHeaderBytes = 8 + 4 + 8 + 8 + 8;

// KVM's structs are stored as the x86-64 KVM ABI lays them out (linux/kvm.h), each preceded
// by its length so that a build with another layout refuses the state instead of misreading it.
template <typename T>
void put_struct(std::vector<uint8_t>& out, const T& value) {
  put_u32_le(out, sizeof(T));
  const auto* bytes = reinterpret_cast<const uint8_t*>(&value);
  out.insert(out.end(), bytes, bytes + sizeof(T));
}

template <typename T>
void put_array(std::vector<uint8_t>& out, const std::vector<T>& values) {
  put_u32_le(out, static_cast<uint32_t>(values.size()));
  put_u32_le(out, sizeof(T));
  const auto* bytes = reinterpret_cast<const uint8_t*>(values.data());
  out.insert(out.end(), bytes, bytes + values.size() * sizeof(T));
}

void put_bytes(std::vector<uint8_t>& out, std::span<const uint8_t> bytes) {
  put_u64_le(out, bytes.size());
  out.insert(out.end(), bytes.begin(), bytes.end());
}

class StateReader {
 public:
  StateReader(std::span<const uint8_t> bytes, std::string_view origin) : reader_(bytes), origin_(origin) {}

  Result<uint32_t> u32(const char* field) {
    auto bytes = reader_.take(4);
    if (!bytes) return truncated(field);
    return get_u32_le(bytes->data());
  }
  Result<uint64_t> u64(const char* field) {
    auto bytes = reader_.take(8);
    if (!bytes) return truncated(field);
    return get_u64_le(bytes->data());
  }
  template <typename T>
  Status read_struct(const char* field, T* value) {
    DELTAVM_ASSIGN_OR_RETURN(uint32_t size, u32(field));
    if (size != sizeof(T)) return layout_mismatch(field, size, sizeof(T));
    auto bytes = reader_.take(size);
    if (!bytes) return truncated(field);
    std::memcpy(value, bytes->data(), size);
    return {};
  }
  template <typename T>
  Status read_array(const char* field, size_t max_count, std::vector<T>* values) {
    DELTAVM_ASSIGN_OR_RETURN(uint32_t count, u32(field));
    DELTAVM_ASSIGN_OR_RETURN(uint32_t size, u32(field));
    if (size != sizeof(T)) return layout_mismatch(field, size, sizeof(T));
    if (count > max_count) {
      return make_error(ErrorCode::kCorruption, "{}: field {} has {} entries, at most {} allowed", origin_, field,
                        count, max_count);
    }
    auto bytes = reader_.take(size_t{count} * size);
    if (!bytes) return truncated(field);
    values->resize(count);
    if (count > 0) std::memcpy(values->data(), bytes->data(), bytes->size());  // data() may be null when empty.
    return {};
  }
  Result<std::vector<uint8_t>> bytes(const char* field) {
    DELTAVM_ASSIGN_OR_RETURN(uint64_t size, u64(field));
    if (size > reader_.remaining()) return truncated(field);
    auto bytes = reader_.take(size);
    return std::vector<uint8_t>(bytes->begin(), bytes->end());
  }
  bool at_end() const { return reader_.at_end(); }
  size_t remaining() const { return reader_.remaining(); }

 private:
  Error truncated(const char* field) const {
    return make_error(ErrorCode::kCorruption, "{}: truncated at field {} (offset {})", origin_, field,
                      kHeaderBytes + reader_.position());
  }
  Error layout_mismatch(const char* field, uint32_t found, size_t expected) const {
    return make_error(ErrorCode::kUnsupported, "{}: field {} is {} bytes, this build's KVM ABI has {}", origin_, field,
                      found, expected);
  }
  ByteReader reader_;
  std::string_view origin_;
};

}  // namespace

std::vector<uint8_t> encode_machine_state(const MachineState& state) {
  std::vector<uint8_t> payload;
  put_bytes(payload, std::span(reinterpret_cast<const uint8_t*>(state.cpu_vendor.data()), state.cpu_vendor.size()));
  put_u32_le(payload, state.tsc_khz);
  put_u64_le(payload, state.memory_bytes);
  put_u32_le(payload, static_cast<uint32_t>(state.kind));
  put_u32_le(payload, static_cast<uint32_t>(state.vcpus.size()));
  for (const VcpuState& vcpu : state.vcpus) {
    put_struct(payload, vcpu.mp_state);
    put_struct(payload, vcpu.regs);
    put_struct(payload, vcpu.sregs);
    put_bytes(payload, vcpu.xsave);
    put_struct(payload, vcpu.xcrs);
    put_struct(payload, vcpu.debugregs);
    put_struct(payload, vcpu.lapic);
    put_u32_le(payload, vcpu.tsc_khz);
    put_array(payload, vcpu.cpuid);
    put_array(payload, vcpu.msrs);
    put_struct(payload, vcpu.events);
  }
  put_struct(payload, state.vm.pit);
  put_struct(payload, state.vm.clock);
  for (const kvm_irqchip& chip : state.vm.irqchips) put_struct(payload, chip);
  put_bytes(payload, state.devices);

  std::vector<uint8_t> out(kMagic, kMagic + sizeof kMagic);
  put_u32_le(out, kVersion);
  put_u64_le(out, payload.size());
  put_u64_le(out, XXH3_64bits(payload.data(), payload.size()));
  put_u64_le(out, XXH3_64bits(out.data(), out.size()));
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

Result<MachineState> decode_machine_state(std::span<const uint8_t> bytes, std::string_view origin) {
  if (bytes.size() < kHeaderBytes) {
    return make_error(ErrorCode::kCorruption, "{}: {} bytes, shorter than the {}-byte header", origin, bytes.size(),
                      kHeaderBytes);
  }
  if (std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0) {
    return make_error(ErrorCode::kCorruption, "{}: not a kvm machine state (bad magic)", origin);
  }
  if (get_u64_le(bytes.data() + 28) != XXH3_64bits(bytes.data(), 28)) {
    return make_error(ErrorCode::kCorruption, "{}: header checksum mismatch", origin);
  }
  uint32_t version = get_u32_le(bytes.data() + 8);
  if (version != kVersion) {
    return make_error(ErrorCode::kUnsupported, "{}: machine state version {}, this build reads {}", origin, version,
                      kVersion);
  }
  uint64_t payload_size = get_u64_le(bytes.data() + 12);
  if (payload_size != bytes.size() - kHeaderBytes) {
    return make_error(ErrorCode::kCorruption, "{}: header says {} payload bytes, file has {}", origin, payload_size,
                      bytes.size() - kHeaderBytes);
  }
  std::span<const uint8_t> payload = bytes.subspan(kHeaderBytes);
  if (get_u64_le(bytes.data() + 20) != XXH3_64bits(payload.data(), payload.size())) {
    return make_error(ErrorCode::kCorruption, "{}: payload checksum mismatch", origin);
  }

  StateReader reader(payload, origin);
  MachineState state;
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> vendor, reader.bytes("cpu_vendor"));
  state.cpu_vendor.assign(vendor.begin(), vendor.end());
  DELTAVM_ASSIGN_OR_RETURN(state.tsc_khz, reader.u32("tsc_khz"));
  DELTAVM_ASSIGN_OR_RETURN(state.memory_bytes, reader.u64("memory_bytes"));
  DELTAVM_ASSIGN_OR_RETURN(uint32_t kind, reader.u32("kind"));
  if (kind != static_cast<uint32_t>(GuestKind::kMicro) && kind != static_cast<uint32_t>(GuestKind::kLinux)) {
    return make_error(ErrorCode::kCorruption, "{}: unknown guest kind {}", origin, kind);
  }
  state.kind = static_cast<GuestKind>(kind);
  DELTAVM_ASSIGN_OR_RETURN(uint32_t vcpu_count, reader.u32("vcpu_count"));
  if (vcpu_count == 0 || vcpu_count > 64) {
    return make_error(ErrorCode::kCorruption, "{}: {} vCPUs, expected 1 to 64", origin, vcpu_count);
  }
  state.vcpus.resize(vcpu_count);
  for (VcpuState& vcpu : state.vcpus) {
    DELTAVM_TRY(reader.read_struct("mp_state", &vcpu.mp_state));
    DELTAVM_TRY(reader.read_struct("regs", &vcpu.regs));
    DELTAVM_TRY(reader.read_struct("sregs", &vcpu.sregs));
    DELTAVM_ASSIGN_OR_RETURN(vcpu.xsave, reader.bytes("xsave"));
    if (vcpu.xsave.size() != kXsaveBytes) {
      return make_error(ErrorCode::kUnsupported, "{}: XSAVE state of {} bytes, this build's KVM ABI has {}", origin,
                        vcpu.xsave.size(), kXsaveBytes);
    }
    DELTAVM_TRY(reader.read_struct("xcrs", &vcpu.xcrs));
    DELTAVM_TRY(reader.read_struct("debugregs", &vcpu.debugregs));
    DELTAVM_TRY(reader.read_struct("lapic", &vcpu.lapic));
    DELTAVM_ASSIGN_OR_RETURN(vcpu.tsc_khz, reader.u32("vcpu tsc_khz"));
    DELTAVM_TRY(reader.read_array("cpuid", kMaxCpuidEntries, &vcpu.cpuid));
    DELTAVM_TRY(reader.read_array("msrs", kMaxMsrEntries, &vcpu.msrs));
    DELTAVM_TRY(reader.read_struct("events", &vcpu.events));
  }
  DELTAVM_TRY(reader.read_struct("pit", &state.vm.pit));
  DELTAVM_TRY(reader.read_struct("clock", &state.vm.clock));
  for (kvm_irqchip& chip : state.vm.irqchips) DELTAVM_TRY(reader.read_struct("irqchip", &chip));
  DELTAVM_ASSIGN_OR_RETURN(state.devices, reader.bytes("devices"));
  if (!reader.at_end()) {
    return make_error(ErrorCode::kCorruption, "{}: {} bytes after the last field", origin, reader.remaining());
  }
  return state;
}

Status check_host_compatibility(const MachineState& state, std::string_view host_vendor, uint32_t host_tsc_khz,
                                uint64_t memory_bytes) {
  if (state.cpu_vendor != host_vendor) {
    return make_error(ErrorCode::kUnsupported, "machine state was captured on a {} CPU, this host is {}",
                      state.cpu_vendor, host_vendor);
  }
  uint64_t difference = state.tsc_khz > host_tsc_khz ? state.tsc_khz - host_tsc_khz : host_tsc_khz - state.tsc_khz;
  if (difference * 1'000'000 > uint64_t{host_tsc_khz} * 250) {
    return make_error(ErrorCode::kUnsupported,
                      "machine state has a TSC of {} kHz, this host's is {} kHz (more than 250 ppm apart)",
                      state.tsc_khz, host_tsc_khz);
  }
  if (state.memory_bytes != memory_bytes) {
    return make_error(ErrorCode::kInvalidArgument, "machine state is for {} bytes of RAM, the RAM offered has {}",
                      state.memory_bytes, memory_bytes);
  }
  return {};
}

}  // namespace deltavm::vmm
