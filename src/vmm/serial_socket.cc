#include "vmm/serial_socket.h"

#include "base/socket.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

namespace deltavm::vmm {

Result<std::unique_ptr<SerialSocket>> SerialSocket::listen(const std::filesystem::path& path, size_t history_bytes,
                                                           Fd log) {
  DELTAVM_ASSIGN_OR_RETURN(Fd listener, listen_unix(path));
  Fd stop(::eventfd(0, EFD_CLOEXEC));
  if (!stop.valid()) return errno_error("eventfd", errno);
  std::unique_ptr<SerialSocket> socket(
      new SerialSocket(std::move(listener), std::move(stop), history_bytes, std::move(log)));
  socket->thread_ = std::thread([raw = socket.get()] { raw->serve(); });
  return socket;
}

SerialSocket::~SerialSocket() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t written = ::write(stop_.get(), &one, sizeof one);
  if (thread_.joinable()) thread_.join();
}

void SerialSocket::set_input(Input input) {
  std::lock_guard lock(mutex_);
  input_ = std::move(input);
}

void SerialSocket::output(uint8_t byte) {
  std::lock_guard lock(mutex_);
  if (history_bytes_ > 0) {
    history_.push_back(static_cast<char>(byte));
    if (history_.size() > 2 * history_bytes_) history_.erase(0, history_.size() - history_bytes_);
  }
  if (log_.valid() && ::write(log_.get(), &byte, 1) != 1) log_ = Fd();  // A full disk ends the log, not the VM.
  if (client_.valid() && ::send(client_.get(), &byte, 1, MSG_NOSIGNAL) != 1) client_ = Fd();
}

void SerialSocket::serve() {
  char buffer[65536];
  for (;;) {
    pollfd fds[3] = {{stop_.get(), POLLIN, 0}, {listener_.get(), POLLIN, 0}, {-1, POLLIN, 0}};
    bool waiting_input;
    {
      std::lock_guard lock(mutex_);
      fds[2].fd = client_.valid() ? client_.get() : -1;
      waiting_input = !pending_input_.empty();
    }
    // Input the guest's FIFO had no room for is offered again every 2 ms.
    if (::poll(fds, 3, waiting_input ? 2 : -1) < 0 && errno != EINTR) return;
    if (fds[0].revents != 0) return;
    std::unique_lock lock(mutex_);
    if (fds[1].revents & POLLIN) {
      Fd client(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (client.valid()) {
        client_ = std::move(client);  // A new client replaces the old one.
        pending_input_.clear();
        size_t start = history_.size() > history_bytes_ ? history_.size() - history_bytes_ : 0;
        if (!history_.empty())
          (void)!::send(client_.get(), history_.data() + start, history_.size() - start, MSG_NOSIGNAL);
      }
    } else if (fds[2].fd >= 0 && fds[2].revents != 0 && fds[2].fd == client_.get()) {
      ssize_t n = ::read(client_.get(), buffer, sizeof buffer);
      if (n <= 0) {
        client_ = Fd();
      } else {
        pending_input_.append(buffer, static_cast<size_t>(n));
      }
    }
    // The guest's input is offered without holding the lock: the guest's output path takes the
    // UART's lock and then this one, so holding this one here could deadlock.
    std::string offered = pending_input_;
    Input input = input_;
    lock.unlock();
    if (offered.empty() || !input) continue;
    size_t taken = input(std::span(reinterpret_cast<const uint8_t*>(offered.data()), offered.size()));
    lock.lock();
    pending_input_.erase(0, taken);  // Only this thread changes pending_input_.
  }
}

}  // namespace deltavm::vmm
