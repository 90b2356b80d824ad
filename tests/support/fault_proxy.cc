#include "support/fault_proxy.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <string_view>

namespace deltavm::testing {
namespace {

Result<Fd> connect_loopback(uint16_t port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return errno_error("socket", errno);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
    return errno_error("connect 127.0.0.1", errno);
  }
  return fd;
}

bool send_everything(int fd, const char* data, size_t size) {
  while (size > 0) {
    ssize_t n = ::send(fd, data, size, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

Result<std::unique_ptr<FaultProxy>> FaultProxy::start(uint16_t upstream_port) {
  std::unique_ptr<FaultProxy> proxy(new FaultProxy());
  proxy->upstream_port_ = upstream_port;
  proxy->listener_ = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (proxy->listener_.get() < 0) return errno_error("socket", errno);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof address;
  if (::bind(proxy->listener_.get(), reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      ::listen(proxy->listener_.get(), 64) != 0 ||
      ::getsockname(proxy->listener_.get(), reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return errno_error("listen on 127.0.0.1", errno);
  }
  proxy->port_ = ntohs(address.sin_port);
  proxy->acceptor_ = std::thread([raw = proxy.get()] { raw->accept_loop(); });
  return proxy;
}

FaultProxy::~FaultProxy() {
  stopping_ = true;
  ::shutdown(listener_.get(), SHUT_RDWR);
  if (acceptor_.joinable()) acceptor_.join();
  for (std::thread& worker : workers_) worker.join();
}

void FaultProxy::fail_next_connections(int count) {
  std::lock_guard lock(mutex_);
  fail_count_ = count;
}

void FaultProxy::cut_a_connection_after(uint64_t bytes) {
  cut_after_ = bytes;
  cut_pending_ = true;
}

void FaultProxy::accept_loop() {
  while (!stopping_) {
    pollfd ready{listener_.get(), POLLIN, 0};
    if (::poll(&ready, 1, 100) <= 0) continue;
    int client = ::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC);
    if (client < 0) continue;
    ++accepted_;
    bool fail = false;
    {
      std::lock_guard lock(mutex_);
      if (fail_count_ > 0) {
        --fail_count_;
        fail = true;
      }
    }
    workers_.emplace_back([this, client, fail] { serve(client, fail); });
  }
}

void FaultProxy::serve(int client_fd, bool fail) {
  Fd client(client_fd);
  if (fail) {
    // Read the request's head, then answer as a store shedding load does.
    std::string head;
    char buffer[4096];
    while (head.find("\r\n\r\n") == std::string::npos && head.size() < (1 << 20)) {
      pollfd ready{client.get(), POLLIN, 0};
      if (::poll(&ready, 1, 5000) <= 0) return;
      ssize_t n = ::recv(client.get(), buffer, sizeof buffer, 0);
      if (n <= 0) return;
      head.append(buffer, static_cast<size_t>(n));
    }
    std::string body = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>injected</Message></Error>";
    std::string answer = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: " +
                         std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
    ++injected_;
    send_everything(client.get(), answer.data(), answer.size());
    ::shutdown(client.get(), SHUT_RDWR);
    return;
  }
  Result<Fd> upstream = connect_loopback(upstream_port_);
  if (!upstream) return;
  uint64_t answered = 0;
  char buffer[64 << 10];
  while (!stopping_) {
    pollfd fds[2] = {{client.get(), POLLIN, 0}, {upstream->get(), POLLIN, 0}};
    if (::poll(fds, 2, 200) < 0 && errno != EINTR) return;
    for (int side = 0; side < 2; ++side) {
      if ((fds[side].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
      int from = side == 0 ? client.get() : upstream->get();
      int to = side == 0 ? upstream->get() : client.get();
      ssize_t n = ::recv(from, buffer, sizeof buffer, 0);
      if (n <= 0) return;
      size_t count = static_cast<size_t>(n);
      uint64_t cut_after = cut_after_.load();
      bool expected = true;
      if (side == 1 && cut_pending_ && answered + count >= cut_after &&
          cut_pending_.compare_exchange_strong(expected, false)) {
        // The part of the answer before the limit, then the connection dies.
        send_everything(to, buffer, answered < cut_after ? cut_after - answered : 0);
        ++injected_;
        ::shutdown(client.get(), SHUT_RDWR);
        return;
      }
      if (side == 1) answered += count;
      if (!send_everything(to, buffer, count)) return;
    }
  }
}

}  // namespace deltavm::testing
