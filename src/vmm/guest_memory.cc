#include "vmm/guest_memory.h"

#include <functional>
#include <mutex>

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include <xxhash.h>

#include "base/page.h"

namespace deltavm::vmm {
namespace {

constexpr uint64_t kPage = kPageSize;

Result<Fd> open_base(const std::filesystem::path& base, uint64_t size_bytes) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(base, O_RDONLY | O_CLOEXEC));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return errno_error(fmt::format("stat {}", base.string()), errno);
  if (static_cast<uint64_t>(st.st_size) != size_bytes) {
    return make_error(ErrorCode::kInvalidArgument, "base RAM {} is {} bytes, the machine has {}", base.string(),
                      st.st_size, size_bytes);
  }
  return fd;
}

}  // namespace

// ---- userfaultfd ---------------------------------------------------------------------------

// Serves first touches of a registered range from the overlay, the base, or the zero page, on
// one thread, until destroyed. KVM touches guest RAM from the kernel (get_user_pages), so the
// userfaultfd must not be UFFD_USER_MODE_ONLY (Linux Documentation/admin-guide/mm/userfaultfd.rst).
class UserfaultServer {
 public:
  static Result<std::unique_ptr<UserfaultServer>> start(std::span<uint8_t> ram, const uint8_t* base, RamOverlay overlay,
                                                        Fd uffd) {
    if (!uffd.valid()) return make_error(ErrorCode::kInvalidArgument, "userfault memory without a userfaultfd");
    uffdio_api api{};
    api.api = UFFD_API;
    if (::ioctl(uffd.get(), UFFDIO_API, &api) != 0) return errno_error("UFFDIO_API", errno);
    uffdio_register registration{};
    registration.range.start = reinterpret_cast<uint64_t>(ram.data());
    registration.range.len = ram.size();
    registration.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (::ioctl(uffd.get(), UFFDIO_REGISTER, &registration) != 0) return errno_error("UFFDIO_REGISTER", errno);
    int stop = ::eventfd(0, EFD_CLOEXEC);
    if (stop < 0) return errno_error("eventfd", errno);
    auto server =
        std::unique_ptr<UserfaultServer>(new UserfaultServer(std::move(uffd), Fd(stop), ram, base, std::move(overlay)));
    server->thread_ = std::thread([raw_server = server.get()] { raw_server->serve(); });
    return server;
  }

  ~UserfaultServer() {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t written = ::write(stop_.get(), &one, sizeof one);
    if (thread_.joinable()) thread_.join();
  }

  const UserfaultStats& stats() const { return stats_; }

  // Where first touches of `page` are served from: the overlay's page, else the base's.
  const uint8_t* source_of(uint64_t page) const {
    const uint8_t* source = overlay_.find(page);
    return source != nullptr ? source : base_ + page * kPage;
  }

  // Called once if a first touch cannot be served (the guest's vCPU then waits forever in the
  // fault; the machine must fail instead). A failure before the call is reported at once.
  void on_failure(std::function<void(std::string)> report) {
    std::lock_guard lock(failure_mutex_);
    report_failure_ = std::move(report);
    if (!failure_.empty() && report_failure_) report_failure_(failure_);
  }

 private:
  void fail(std::string reason) {
    std::lock_guard lock(failure_mutex_);
    if (!failure_.empty()) return;
    failure_ = std::move(reason);
    if (report_failure_) report_failure_(failure_);
  }

  UserfaultServer(Fd uffd, Fd stop, std::span<uint8_t> ram, const uint8_t* base, RamOverlay overlay)
      : uffd_(std::move(uffd)), stop_(std::move(stop)), ram_(ram), base_(base), overlay_(std::move(overlay)) {}

  void serve() {
    pollfd fds[2] = {{uffd_.get(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
    uffd_msg messages[16];
    for (;;) {
      if (::poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        fail(fmt::format("userfaultfd server: poll: {}", std::strerror(errno)));
        return;
      }
      if (fds[1].revents != 0) return;
      ssize_t n = ::read(uffd_.get(), messages, sizeof messages);
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;  // Another wakeup took it.
      if (n < 0) {
        fail(fmt::format("userfaultfd server: read: {}", std::strerror(errno)));
        return;
      }
      for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(uffd_msg); ++i) {
        if (messages[i].event != UFFD_EVENT_PAGEFAULT) continue;
        if (Status served = serve_page(messages[i].arg.pagefault.address); !served) {
          fail(served.error().message);
          return;
        }
      }
    }
  }

  Status serve_page(uint64_t address) {
    uint64_t start = reinterpret_cast<uint64_t>(ram_.data());
    uint64_t page = (address - start) / kPage;
    uint64_t page_address = start + page * kPage;
    const uint8_t* source = overlay_.find(page);
    if (source != nullptr) {
      stats_.overlay_pages.fetch_add(1, std::memory_order_relaxed);
    } else if (!is_zero_page(base_ + page * kPage)) {
      source = base_ + page * kPage;
      stats_.base_pages.fetch_add(1, std::memory_order_relaxed);
    }
    for (;;) {
      int result;
      if (source != nullptr) {
        uffdio_copy copy{};
        copy.dst = page_address;
        copy.src = reinterpret_cast<uint64_t>(source);
        copy.len = kPage;
        result = ::ioctl(uffd_.get(), UFFDIO_COPY, &copy);
      } else {
        uffdio_zeropage zero{};
        zero.range.start = page_address;
        zero.range.len = kPage;
        result = ::ioctl(uffd_.get(), UFFDIO_ZEROPAGE, &zero);
        if (result == 0) stats_.zero_pages.fetch_add(1, std::memory_order_relaxed);
      }
      // EEXIST: another fault on the same page was served first; EAGAIN: the mm changed
      // under the copy, try again.
      if (result == 0 || errno == EEXIST) return {};
      if (errno != EAGAIN) {
        return errno_error(
            fmt::format("userfaultfd: {} of guest page {}", source ? "UFFDIO_COPY" : "UFFDIO_ZEROPAGE", page), errno);
      }
    }
  }

  Fd uffd_;
  Fd stop_;
  std::span<uint8_t> ram_;
  const uint8_t* base_;
  RamOverlay overlay_;
  UserfaultStats stats_;
  std::mutex failure_mutex_;
  std::string failure_;
  std::function<void(std::string)> report_failure_;
  std::thread thread_;
};

// ---- guest memory --------------------------------------------------------------------------

GuestMemory::GuestMemory() = default;
GuestMemory::GuestMemory(GuestMemory&&) noexcept = default;
GuestMemory& GuestMemory::operator=(GuestMemory&&) noexcept = default;
GuestMemory::~GuestMemory() = default;

void GuestMemory::on_failure(std::function<void(std::string)> report) {
  if (server_) server_->on_failure(std::move(report));
}

std::pair<uint64_t, uint64_t> GuestMemory::digest() const {
  XXH3_state_t* state = XXH3_createState();
  XXH3_128bits_reset(state);
  size_t pages = ram_.size() / kPage;
  std::vector<unsigned char> resident;
  // Which pages a userfault load has served: the others are not touched (that would fault
  // them in, copying the base into this process for nothing). mincore cannot tell a swapped
  // out page from one never served: such a page is read from its source, and a digest that
  // then differs fails the capture it checks, never passes a wrong one.
  if (server_) {
    resident.resize(pages);
    if (::mincore(ram_.data(), ram_.size(), resident.data()) != 0) resident.assign(pages, 1);
  }
  for (size_t page = 0; page < pages; ++page) {
    bool in_ram = !server_ || (resident[page] & 1) != 0;
    const uint8_t* bytes = in_ram ? ram_.data() + page * kPage : server_->source_of(page);
    XXH3_128bits_update(state, bytes, kPage);
  }
  XXH128_hash_t hash = XXH3_128bits_digest(state);
  XXH3_freeState(state);
  return {hash.high64, hash.low64};
}

const UserfaultStats* GuestMemory::userfault_stats() const { return server_ ? &server_->stats() : nullptr; }

Result<GuestMemory> GuestMemory::anonymous(uint64_t size_bytes) {
  GuestMemory memory;
  DELTAVM_ASSIGN_OR_RETURN(memory.ram_, Mapping::map(-1, size_bytes, PROT_READ | PROT_WRITE,
                                                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, 0, "guest RAM"));
  return memory;
}

Result<GuestMemory> GuestMemory::shared_file(const std::filesystem::path& file, uint64_t size_bytes) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(file, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (::ftruncate(fd.get(), static_cast<off_t>(size_bytes)) != 0) {
    return errno_error(fmt::format("truncate {}", file.string()), errno);
  }
  GuestMemory memory;
  DELTAVM_ASSIGN_OR_RETURN(memory.ram_,
                           Mapping::map(fd.get(), size_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, 0, file.string()));
  return memory;
}

Result<Fd> GuestMemory::create_userfaultfd() {
  int raw = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (raw < 0) return errno_error("userfaultfd", errno);
  return Fd(raw);
}

Result<GuestMemory> GuestMemory::load(MemoryStrategy strategy, const std::filesystem::path& base, RamOverlay overlay,
                                      uint64_t size_bytes, Fd userfault) {
  DELTAVM_ASSIGN_OR_RETURN(Fd base_fd, open_base(base, size_bytes));
  GuestMemory memory;
  auto write_overlay = [&] {
    for (size_t i = 0; i < overlay.page_count(); ++i) {
      std::memcpy(memory.ram_.data() + overlay.pages()[i] * kPage, overlay.page_bytes(i), kPage);
    }
  };
  switch (strategy) {
    case MemoryStrategy::kEager: {
      DELTAVM_ASSIGN_OR_RETURN(memory, anonymous(size_bytes));
      // Read the base in chunks and copy only its non-zero pages: fresh anonymous memory is
      // already zero, and touching it costs a page fault per page.
      std::vector<uint8_t> chunk(1 << 20);
      for (uint64_t offset = 0; offset < size_bytes; offset += chunk.size()) {
        size_t want = static_cast<size_t>(std::min<uint64_t>(chunk.size(), size_bytes - offset));
        ssize_t got = ::pread(base_fd.get(), chunk.data(), want, static_cast<off_t>(offset));
        if (got != static_cast<ssize_t>(want)) {
          return errno_error(fmt::format("read {} at {}", base.string(), offset), got < 0 ? errno : EIO);
        }
        for (size_t page = 0; page < want; page += kPage) {
          if (!is_zero_page(chunk.data() + page))
            std::memcpy(memory.ram_.data() + offset + page, chunk.data() + page, kPage);
        }
      }
      write_overlay();
      return memory;
    }
    case MemoryStrategy::kPrivate: {
      // Never MAP_POPULATE: on a private writable mapping it breaks copy-on-write for every page.
      DELTAVM_ASSIGN_OR_RETURN(memory.ram_, Mapping::map(base_fd.get(), size_bytes, PROT_READ | PROT_WRITE,
                                                         MAP_PRIVATE | MAP_NORESERVE, 0, base.string()));
      write_overlay();
      return memory;
    }
    case MemoryStrategy::kUserfault: {
      DELTAVM_ASSIGN_OR_RETURN(memory, anonymous(size_bytes));
      DELTAVM_ASSIGN_OR_RETURN(memory.base_,
                               Mapping::map(base_fd.get(), size_bytes, PROT_READ, MAP_SHARED, 0, base.string()));
      DELTAVM_ASSIGN_OR_RETURN(memory.server_, UserfaultServer::start(memory.bytes(), memory.base_.data(),
                                                                      std::move(overlay), std::move(userfault)));
      return memory;
    }
  }
  return make_error(ErrorCode::kInvalidArgument, "unknown memory strategy");
}

}  // namespace deltavm::vmm
