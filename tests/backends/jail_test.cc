// The jail's settings and its uid claims (backends/jail.h): a malformed setting is an error
// naming the variable, and a uid is held exactly as long as its lock is.
#include "backends/jail.h"

#include <gtest/gtest.h>

#include <cstdlib>

namespace deltavm {
namespace {

class JailSettings : public ::testing::Test {
 protected:
  void TearDown() override {
    ::unsetenv("DELTAVM_JAIL");
    ::unsetenv("DELTAVM_JAIL_UIDS");
  }
  static std::string error_for(const char* variable, const char* value) {
    ::setenv(variable, value, 1);
    Result<JailPolicy> policy = JailPolicy::from_environment();
    ::unsetenv(variable);
    return policy ? std::string() : policy.error().message;
  }
};

TEST_F(JailSettings, MalformedValuesAreRefusedNamingTheVariable) {
  for (const char* range :
       {"", "-", "5", "x-9", "9-x", "10-5", "0-5", "1-99999999999", "1-4294967295", "1--2", " 1-2"}) {
    std::string error = error_for("DELTAVM_JAIL_UIDS", range);
    if (*range == '\0') {
      EXPECT_EQ(error, "") << "an empty range means the default";
      continue;
    }
    EXPECT_NE(error.find("DELTAVM_JAIL_UIDS"), std::string::npos) << "range " << range << ": " << error;
  }
  EXPECT_NE(error_for("DELTAVM_JAIL", "yes").find("DELTAVM_JAIL=yes: expected on or off"), std::string::npos);
}

TEST_F(JailSettings, RangeAndOffAreRead) {
  ::setenv("DELTAVM_JAIL_UIDS", "3000000-3000009", 1);
  ::setenv("DELTAVM_JAIL", "off", 1);
  Result<JailPolicy> policy = JailPolicy::from_environment();
  ASSERT_TRUE(policy) << policy.error().message;
  EXPECT_EQ(policy->first_uid, 3'000'000u);
  EXPECT_EQ(policy->uid_count, 10u);
  EXPECT_FALSE(policy->enabled);
  EXPECT_EQ(policy->why_not, "DELTAVM_JAIL=off");
}

TEST(JailUids, EachClaimGetsAUidNoOtherHoldsUntilItsLockGoes) {
  std::filesystem::path runtime = std::filesystem::path(::testing::TempDir()) / "deltavm_jail_uids";
  std::filesystem::remove_all(runtime);
  std::filesystem::create_directories(runtime);
  JailPolicy policy;
  policy.first_uid = 4'000'000;
  policy.uid_count = 2;
  Result<JailUid> first = claim_jail_uid(runtime, policy);
  Result<JailUid> second = claim_jail_uid(runtime, policy);
  ASSERT_TRUE(first && second);
  EXPECT_NE(first->uid, second->uid);
  for (const JailUid* claim : {&*first, &*second}) {
    EXPECT_GE(claim->uid, 4'000'000u);
    EXPECT_LE(claim->uid, 4'000'001u);
  }
  Result<JailUid> third = claim_jail_uid(runtime, policy);
  ASSERT_FALSE(third);
  EXPECT_EQ(third.error().code, ErrorCode::kLimit) << third.error().message;
  uint32_t released = first->uid;
  *first = JailUid{};  // Its lock closes: the uid is free again.
  Result<JailUid> again = claim_jail_uid(runtime, policy);
  ASSERT_TRUE(again) << again.error().message;
  EXPECT_EQ(again->uid, released);
  std::filesystem::remove_all(runtime);
}

}  // namespace
}  // namespace deltavm
