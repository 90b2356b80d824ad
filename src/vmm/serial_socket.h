// The host end of a guest serial port in deltavm-vmm: a Unix socket server that one client at
// a time uses, as QEMU's `-chardev socket,server=on,wait=off` (so `deltavm console` and the
// agent client work the same on both backends). Guest output goes to the connected client;
// the console also keeps a short history that each new client gets first, so a client that
// connects late still sees the boot's last lines. Client bytes go to the guest as fast as its
// receive FIFO takes them. The console may also append all guest output to a log file.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>

#include "base/error.h"
#include "base/file.h"

namespace deltavm::vmm {

class SerialSocket {
 public:
  // Bytes for the guest; returns how many it took (its FIFO may be full).
  using Input = std::function<size_t(std::span<const uint8_t>)>;

  // `log`, if valid, gets every byte the guest writes (opened O_APPEND by the caller, so that
  // whoever reads it may also truncate it).
  static Result<std::unique_ptr<SerialSocket>> listen(const std::filesystem::path& path, size_t history_bytes,
                                                      Fd log = Fd());
  ~SerialSocket();

  void set_input(Input input);
  // A byte the guest wrote. Called from a vCPU thread; blocks while the client is slow.
  void output(uint8_t byte);

 private:
  SerialSocket(Fd listener, Fd stop, size_t history_bytes, Fd log)
      : listener_(std::move(listener)), stop_(std::move(stop)), history_bytes_(history_bytes), log_(std::move(log)) {}
  void serve();

  Fd listener_;
  Fd stop_;  // eventfd: ends serve().
  size_t history_bytes_;
  Fd log_;
  std::mutex mutex_;
  Fd client_;
  std::string history_;
  std::string pending_input_;
  Input input_;
  std::thread thread_;
};

}  // namespace deltavm::vmm
