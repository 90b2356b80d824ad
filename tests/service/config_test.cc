// The service's configuration file: every field checked, errors naming the file and the field.
#include <gtest/gtest.h>

#include "service/config.h"

namespace deltavm {
namespace {

TEST(ServiceConfig, EveryFieldIsReadAndTheRestKeepTheirDefaults) {
  Result<ServiceConfig> config = parse_service_config(
      R"({"max_vms": 5, "max_memory_mib": 2048, "default_ttl_seconds": 60, "max_ttl_seconds": 600,
          "max_concurrent_loads": 3, "pools": {"web": 2, "base": 0}})",
      "serve.json");
  ASSERT_TRUE(config) << config.error().message;
  EXPECT_EQ(config->max_vms, 5u);
  EXPECT_EQ(config->max_memory_bytes, uint64_t{2048} << 20);
  EXPECT_EQ(config->default_ttl_seconds, 60u);
  EXPECT_EQ(config->max_ttl_seconds, 600u);
  EXPECT_EQ(config->max_concurrent_loads, 3u);
  EXPECT_EQ(config->pools, (std::map<std::string, uint64_t>{{"web", 2}, {"base", 0}}));

  Result<ServiceConfig> defaults = parse_service_config("{}", "serve.json");
  ASSERT_TRUE(defaults) << defaults.error().message;
  EXPECT_EQ(defaults->max_vms, 64u);
  EXPECT_GT(defaults->max_memory_bytes, 0u);
  EXPECT_GE(defaults->max_concurrent_loads, 2u);
  EXPECT_TRUE(defaults->pools.empty());
}

TEST(ServiceConfig, BadValuesAreRefusedNamingTheFileAndTheField) {
  for (const auto& [text, field] : std::vector<std::pair<std::string, std::string>>{
           {R"({"max_vms": -1})", "max_vms"},
           {R"({"max_vms": "64"})", "max_vms"},
           {R"({"max_memory_mib": 1.5})", "max_memory_mib"},
           {R"({"max_concurrent_loads": 0})", "max_concurrent_loads"},
           {R"({"max_concurrent_loads": 100000})", "max_concurrent_loads"},
           {R"({"max_ttl_seconds": 60, "default_ttl_seconds": 61})", "default_ttl_seconds"},
           {R"({"pools": {"web": 257}})", "pools.web"},
           {R"({"pools": {"web": -2}})", "pools.web"},
           {R"({"pools": [1]})", "pools"},
           {R"({"pool": {"web": 1}})", "pool"},
           {R"([1, 2])", "not a JSON object"},
           {R"({"max_vms": 1)", "not a JSON object"},
       }) {
    Result<ServiceConfig> config = parse_service_config(text, "/etc/deltavm/serve.json");
    ASSERT_FALSE(config) << text;
    EXPECT_NE(config.error().message.find("/etc/deltavm/serve.json"), std::string::npos) << config.error().message;
    EXPECT_NE(config.error().message.find(field), std::string::npos) << text << ": " << config.error().message;
  }
}

}  // namespace
}  // namespace deltavm
