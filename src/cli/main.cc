// deltavm: loads virtual machines from delta-chained memory images.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>

#include "cli/commands.h"

namespace {

int run(int argc, char** argv) {
  CLI::App app{"deltavm: store guest RAM images as delta chains and load VMs from them"};
  app.require_subcommand(1);
  app.fallthrough();
  app.set_version_flag("--version", "deltavm 0.1");
  deltavm::cli::GlobalOptions options;
  app.add_flag("--json", options.json, "Print machine-readable JSON instead of tables");
  app.add_option("--store", options.store_directory,
                 "Store directory (default: $DELTAVM_STORE, else ~/.local/share/deltavm)");
  app.add_option("--runtime", options.runtime_directory,
                 "Directory of running VMs (default: $DELTAVM_RUNTIME, else /run/deltavm as root)");
  int exit_status = 0;
  deltavm::cli::add_image_commands(app, options, exit_status);
  deltavm::cli::add_store_commands(app, options, exit_status);
  deltavm::cli::add_remote_commands(app, options, exit_status);
  deltavm::cli::add_vm_commands(app, options, exit_status);
  deltavm::cli::add_service_commands(app, options, exit_status);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    // --help and --version end with 0; every other parse error is a usage error: 2.
    return app.exit(error) == 0 ? 0 : 2;
  }
  return exit_status;
}

}  // namespace

int main(int argc, char** argv) {
  // Library code returns errors as values; what can still throw here is the standard library
  // out of memory, or the command-line parser's setup. Either ends with one line, not abort().
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "deltavm: internal error: %s\n", error.what());
    return 70;
  }
}
