#include "support/object_store.h"

#include <cstdlib>
#include <fstream>
#include <random>

namespace deltavm {

Result<TestObjectStore> TestObjectStore::locate() {
  const char* directory = std::getenv("DELTAVM_OBJECT_STORE_DIR");
  if (directory == nullptr) {
    return make_error(ErrorCode::kNotFound,
                      "DELTAVM_OBJECT_STORE_DIR is not set (ctest's object_store fixture sets it)");
  }
  std::string path = std::string(directory) + "/env";
  std::ifstream file(path);
  if (!file)
    return make_error(ErrorCode::kNotFound, "{}: no running object store (scripts/object-store.sh start)", path);
  TestObjectStore store;
  for (std::string line; std::getline(file, line);) {
    if (!line.starts_with("export ")) continue;
    size_t equals = line.find('=');
    if (equals == std::string::npos) continue;
    store.environment[line.substr(7, equals - 7)] = line.substr(equals + 1);
  }
  store.endpoint = store.environment["DELTAVM_S3_ENDPOINT"];
  store.credentials = {store.environment["AWS_ACCESS_KEY_ID"], store.environment["AWS_SECRET_ACCESS_KEY"]};
  if (store.endpoint.empty() || store.credentials.access_key_id.empty()) {
    return make_error(ErrorCode::kCorruption, "{}: lacks DELTAVM_S3_ENDPOINT or AWS_ACCESS_KEY_ID", path);
  }
  return store;
}

Result<S3Client> TestObjectStore::fresh_bucket(const std::string& label, S3Options options) const {
  std::string name = "t-" + label.substr(0, 40) + "-" + std::to_string(std::random_device{}() % 1000000);
  for (char& c : name) c = static_cast<char>(std::isalnum(static_cast<unsigned char>(c)) ? std::tolower(c) : '-');
  DELTAVM_ASSIGN_OR_RETURN(S3Client client, S3Client::open({.endpoint = endpoint, .name = name}, credentials, options));
  DELTAVM_TRY(client.create_bucket());
  return client;
}

}  // namespace deltavm
