// The object store the tests run against: the one-node Swift that ctest's object_store
// fixture starts (scripts/object-store.sh), found through DELTAVM_OBJECT_STORE_DIR.
#pragma once

#include <map>
#include <string>

#include "base/error.h"
#include "store/s3_client.h"

namespace deltavm {

struct TestObjectStore {
  std::string endpoint;
  S3Credentials credentials;
  std::map<std::string, std::string> environment;  // What `object-store.sh env` exports.

  // Reads DIR/env of the running store; an error names what is missing.
  static Result<TestObjectStore> locate();
  // A bucket name no other test uses (the test's name and a random suffix), created.
  Result<S3Client> fresh_bucket(const std::string& label, S3Options options = {}) const;
};

}  // namespace deltavm
