// The subcommands of `deltavm`, grouped by the layer they drive.
#pragma once

#include <CLI/CLI.hpp>

#include "cli/output.h"
#include "store/store.h"

namespace deltavm::cli {

// The store named by --store, $DELTAVM_STORE or the default. Only commands that add images
// pass `create`: a mistyped --store never turns into a new, empty store for the others.
enum class StoreAccess { kExisting, kCreate };
Result<Store> open_store(const GlobalOptions& options, StoreAccess access = StoreAccess::kExisting);

// Each adds its subcommands to `app`; a subcommand sets `exit_status` when it runs.
void add_image_commands(CLI::App& app, const GlobalOptions& options, int& exit_status);
void add_store_commands(CLI::App& app, const GlobalOptions& options, int& exit_status);
void add_vm_commands(CLI::App& app, const GlobalOptions& options, int& exit_status);

}  // namespace deltavm::cli
