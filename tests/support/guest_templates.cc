#include "support/guest_templates.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fstream>
#include <memory>

#include "backends/qemu/qemu_backend.h"
#include "templates/initramfs.h"
#include "templates/kernel_image.h"

namespace deltavm::testing {
namespace {

// What the templates depend on besides the source: this test binary and the guest agent that
// goes into every initramfs. A change to either rebuilds them.
std::string stamp() {
  std::string text;
  std::error_code error;
  std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", error);
  Result<GuestKit> kit = GuestKit::locate();
  for (const std::filesystem::path& path : {self, kit ? kit->agent : std::filesystem::path()}) {
    struct stat st {};
    if (!path.empty() && ::stat(path.c_str(), &st) == 0) {
      text += fmt::format("{} {} {}.{}\n", path.string(), st.st_size, st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
    }
  }
  return text;
}

}  // namespace

TemplateSpec parse_spec(const std::string& json, const std::filesystem::path& origin) {
  Result<TemplateSpec> spec = parse_template_spec(json, origin);
  EXPECT_TRUE(spec) << spec.error().message;
  return spec ? *spec : TemplateSpec{};
}

Result<GuestTemplates> guest_templates() {
  static std::optional<GuestTemplates> built;
  if (built) return *built;
  GuestTemplates templates;
  templates.root = std::filesystem::path(::testing::TempDir()) / "deltavm_guest_templates";
  std::filesystem::path stamp_file = templates.root / "stamp";
  std::ifstream in(stamp_file);
  std::string found((std::istreambuf_iterator<char>(in)), {});
  std::string expected = stamp();
  bool reuse = found == expected;
  if (!reuse) {
    std::error_code error;
    std::filesystem::remove_all(templates.root, error);
    std::filesystem::create_directories(templates.root, error);
  }
  DELTAVM_ASSIGN_OR_RETURN(Store store, Store::open_or_create(templates.root / "store", template_reference_kinds()));
  templates.store = new Store(std::move(store));
  templates.backend = make_qemu_backend().release();
  if (!reuse || !templates.store->find("base") || !templates.store->find("counter")) {
    std::filesystem::path runtime = templates.root / "build-runtime";
    DELTAVM_TRY(build_template(parse_spec(R"({"name": "base", "memory_mib": 128})", templates.root / "base.json"),
                               *templates.store, *templates.backend, runtime));
    DELTAVM_TRY(build_template(parse_spec(R"({
      "name": "counter", "parent": "base", "memory_mib": 128,
      "setup": ["echo made-before-capture > /tmp/marker",
                "(n=0; while true; do n=$((n+1)); echo $n > /run/ticks; sleep 0.2; done) &",
                "sleep 1"]})",
                                          templates.root / "counter.json"),
                               *templates.store, *templates.backend, runtime));
    std::ofstream(stamp_file) << expected;
  }
  built = templates;
  return templates;
}

}  // namespace deltavm::testing
