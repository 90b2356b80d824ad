// The subcommands of `deltavm`, grouped by the layer they drive.
#pragma once

#include <CLI/CLI.hpp>

#include <optional>

#include "cli/output.h"
#include "service/client.h"
#include "store/store.h"

namespace deltavm::cli {

// The store named by --store, $DELTAVM_STORE or the default. Only commands that add images
// pass `create`: a mistyped --store never turns into a new, empty store for the others.
enum class StoreAccess { kExisting, kCreate };
Result<Store> open_store(const GlobalOptions& options, StoreAccess access = StoreAccess::kExisting);

// The runtime directory named by --runtime, $DELTAVM_RUNTIME or the default.
std::filesystem::path runtime_directory(const GlobalOptions& options);

// A client of the service that serves this runtime, if one runs: run, exec, ps and stop go
// through it. kConflict if it serves another store than the one named.
Result<std::optional<ServiceClient>> connect_service(const GlobalOptions& options);

// Each adds its subcommands to `app`; a subcommand sets `exit_status` when it runs.
void add_image_commands(CLI::App& app, const GlobalOptions& options, int& exit_status);
void add_store_commands(CLI::App& app, const GlobalOptions& options, int& exit_status);
void add_remote_commands(CLI::App& app, const GlobalOptions& options, int& exit_status);
void add_vm_commands(CLI::App& app, const GlobalOptions& options, int& exit_status);
void add_service_commands(CLI::App& app, const GlobalOptions& options, int& exit_status);

}  // namespace deltavm::cli
