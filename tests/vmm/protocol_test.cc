// The VMM's control protocol (host-only): every request and reply round-trips, and every
// malformed field of every request is refused with an error naming it, never a throw.
#include "vmm/protocol.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace deltavm::vmm {
namespace {

using nlohmann::json;

std::vector<Request> sample_requests() {
  BootMicroRequest micro;
  micro.program = "/x/micro.bin";
  micro.memory_bytes = 64 << 20;
  micro.work_bytes = 48 << 20;
  micro.passes = 6;
  micro.seed = 7;
  micro.ram_file = "/x/ram";
  micro.start = {true, 3, true};
  BootLinuxRequest linux_boot{"/k", "/i", "console=ttyS0", 128 << 20, 2, std::nullopt, {}};
  RestoreRequest restore;
  restore.state = "/s";
  restore.base = "/b";
  restore.overlay = "/o";
  restore.strategy = MemoryStrategy::kPrivate;
  restore.step_first_instruction = true;
  restore.wait_first_report = true;
  SaveRequest save{"/s", std::nullopt, "/r"};
  return {micro,           linux_boot,     restore,
          StatusRequest{}, PauseRequest{}, ResumeRequest{4},
          WaitRequest{5},  save,           SerialOutputRequest{1},
          FloorRequest{},  QuitRequest{}};
}

TEST(VmmProtocol, EveryRequestRoundTrips) {
  for (const Request& request : sample_requests()) {
    std::string line = encode_request(request);
    Result<Request> decoded = decode_request(line);
    ASSERT_TRUE(decoded) << line << ": " << decoded.error().message;
    EXPECT_TRUE(*decoded == request) << line;
  }
}

TEST(VmmProtocol, EveryReplyRoundTrips) {
  StatusReply status;
  status.state = RunState::kDone;
  status.failure = "why";
  status.micro = MicroGuestReport{3, 9, true, 0, 0xfedcba9876543210ull};
  status.userfault = UserfaultCounts{1, 2, 3};
  status.timings = RestoreTimings{1.5, 2.5, 3.5, -1};
  for (const Reply& reply :
       std::vector<Reply>{status, SaveReply{10, 20}, SerialOutputReply{"a\nb\x01"}, FloorReply{12.5}, QuitReply{}}) {
    std::string line = encode_reply(reply);
    Result<Reply> decoded = decode_reply(line);
    ASSERT_TRUE(decoded) << line << ": " << decoded.error().message;
    EXPECT_TRUE(*decoded == reply) << line;
  }
}

TEST(VmmProtocol, ErrorRepliesKeepTheirKind) {
  for (ErrorCode code : {ErrorCode::kInvalidArgument, ErrorCode::kCorruption, ErrorCode::kNotFound,
                         ErrorCode::kAlreadyExists, ErrorCode::kIo, ErrorCode::kUnsupported, ErrorCode::kBusy}) {
    Result<Reply> decoded = decode_reply(encode_reply(Result<Reply>(Error{code, "the message"})));
    ASSERT_FALSE(decoded);
    EXPECT_EQ(decoded.error().code, code);
    EXPECT_EQ(decoded.error().message, "the message");
  }
}

// Each request's JSON with one field replaced (or removed, for nullptr), and the field the error
// must name.
struct Malformed {
  std::string op;
  std::string field;
  json value;  // null: the field is removed.
};

TEST(VmmProtocol, EveryMalformedFieldIsRefusedByName) {
  std::vector<Malformed> cases = {
      {"boot_micro", "program", 5},
      {"boot_micro", "program", nullptr},
      {"boot_micro", "memory_bytes", "big"},
      {"boot_micro", "memory_bytes", -1},
      {"boot_micro", "memory_bytes", 1ull << 40},
      {"boot_micro", "memory_bytes", nullptr},
      {"boot_micro", "work_bytes", 1.5},
      {"boot_micro", "passes", true},
      {"boot_micro", "passes", 1ull << 30},
      {"boot_micro", "seed", "x"},
      {"boot_micro", "heartbeat_bytes", json::array()},
      {"boot_micro", "ram_file", 1},
      {"boot_micro", "paused", "yes"},
      {"boot_micro", "log_dirty", 0},
      {"boot_micro", "pause_at_checkpoint", -3},
      {"boot_linux", "kernel", json::object()},
      {"boot_linux", "initrd", nullptr},
      {"boot_linux", "command_line", 7},
      {"boot_linux", "vcpus", 0},
      {"boot_linux", "vcpus", 65},
      {"boot_linux", "vcpus", "two"},
      {"restore", "state", false},
      {"restore", "base", nullptr},
      {"restore", "overlay", 3},
      {"restore", "strategy", "lazy"},
      {"restore", "strategy", 2},
      {"restore", "step_first_instruction", "no"},
      {"restore", "wait_first_report", 1},
      {"resume", "pause_at_checkpoint", "4"},
      {"wait", "timeout_ms", -1},
      {"wait", "timeout_ms", "soon"},
      {"save", "state", 1},
      {"save", "dirty", json::array()},
      {"save", "ram", true},
      {"serial_output", "port", 2},
      {"serial_output", "port", "0"},
  };
  std::map<std::string, json> valid;
  for (const Request& request : sample_requests()) {
    json document = json::parse(encode_request(request));
    valid[document["op"]] = document;
  }
  for (const Malformed& test : cases) {
    json document = valid.at(test.op);
    if (test.value.is_null())
      document.erase(test.field);
    else
      document[test.field] = test.value;
    std::string line = document.dump();
    Result<Request> decoded = decode_request(line);
    ASSERT_FALSE(decoded) << line;
    EXPECT_EQ(decoded.error().code, ErrorCode::kInvalidArgument) << line;
    EXPECT_NE(decoded.error().message.find(test.field), std::string::npos) << line << ": " << decoded.error().message;
  }
}

TEST(VmmProtocol, UnknownRequestsAndFieldsAndNonObjectsAreRefused) {
  for (const std::string& line :
       {std::string(R"({"op": "reboot"})"), std::string(R"({"op": 3})"), std::string(R"({"no_op": 1})"),
        std::string(R"({"op": "status", "verbose": true})"), std::string(R"({"op": "pause", "op2": 1})"),
        std::string("[1, 2]"), std::string("not json"), std::string(""), std::string("{\"op\": \"status\""),
        std::string(kMaxLineBytes + 1, ' ')}) {
    Result<Request> decoded = decode_request(line);
    ASSERT_FALSE(decoded) << line.substr(0, 80);
    EXPECT_EQ(decoded.error().code, ErrorCode::kInvalidArgument);
  }
  Result<Request> typo = decode_request(R"({"op": "status", "verbose": true})");
  ASSERT_FALSE(typo);
  EXPECT_NE(typo.error().message.find("unknown field verbose"), std::string::npos) << typo.error().message;
}

TEST(VmmProtocol, MalformedRepliesAreIoErrors) {
  for (const std::string& line :
       {std::string(R"({"ok": true})"), std::string(R"({"ok": true, "reply": "nonsense"})"),
        std::string(R"({"ok": true, "reply": "status", "state": "dancing"})"),
        std::string(R"({"ok": true, "reply": "status", "state": "paused", "micro": {"checkpoint": "x"}})"),
        std::string(R"({"ok": false})"), std::string(R"({"ok": false, "error": "text"})"), std::string("garbage")}) {
    Result<Reply> decoded = decode_reply(line);
    ASSERT_FALSE(decoded) << line;
    EXPECT_EQ(decoded.error().code, ErrorCode::kIo) << line;
  }
}

}  // namespace
}  // namespace deltavm::vmm
