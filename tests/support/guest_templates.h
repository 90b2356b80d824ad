// Real Linux templates for the tests that need running VMs: one store, built by the first
// test process that asks for it and reused by the others (ctest runs each test in a process of
// its own) until the test binary or the guest agent changes.
//
//   base     128 MiB, the guest kit's kernel and deltavm's /init
//   counter  base + a file made before capture and a counter that keeps running
#pragma once

#include <filesystem>
#include <string>

#include "backends/backend.h"
#include "base/error.h"
#include "store/store.h"
#include "templates/templates.h"

namespace deltavm::testing {

struct GuestTemplates {
  Store* store = nullptr;
  Backend* backend = nullptr;  // qemu.
  std::filesystem::path root;  // The store is root/store; tests make runtimes below root.
};

// Builds the templates on first use. The returned pointers live until the process ends.
Result<GuestTemplates> guest_templates();

// The stored spec of `name` parsed, origin named for errors.
TemplateSpec parse_spec(const std::string& json, const std::filesystem::path& origin);

}  // namespace deltavm::testing
