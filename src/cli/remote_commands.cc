// deltavm remote add | ls | rm, push, pull
#include <fmt/ranges.h>
#include <unistd.h>

#include "cli/commands.h"
#include "store/remote.h"
#include "templates/templates.h"

namespace deltavm::cli {
namespace {

Status run_remote_add(const GlobalOptions& options, const std::string& name, const std::string& url,
                      const std::string& endpoint, const std::string& region) {
  DELTAVM_ASSIGN_OR_RETURN(RemoteRecord record, make_remote_record(name, url, endpoint, region));
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options, StoreAccess::kCreate));
  DELTAVM_TRY(store.add_remote(record));
  if (options.json) {
    print_json({{"name", record.name}, {"url", record.url}, {"endpoint", record.endpoint}, {"region", record.region}});
  } else {
    fmt::print("remote {}: {} at {}\n", record.name, record.url, record.endpoint);
  }
  return {};
}

Status run_remote_ls(const GlobalOptions& options) {
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<RemoteRecord> remotes, store.remotes());
  if (options.json) {
    nlohmann::json list = nlohmann::json::array();
    for (const RemoteRecord& remote : remotes) {
      list.push_back(
          {{"name", remote.name}, {"url", remote.url}, {"endpoint", remote.endpoint}, {"region", remote.region}});
    }
    print_json({{"remotes", list}});
    return {};
  }
  Table table({"name", "url", "endpoint", "region"});
  for (const RemoteRecord& remote : remotes) table.add_row({remote.name, remote.url, remote.endpoint, remote.region});
  table.print();
  return {};
}

Status run_remote_rm(const GlobalOptions& options, const std::string& name) {
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
  DELTAVM_TRY(store.remove_remote(name));
  if (!options.json) fmt::print("removed remote {}\n", name);
  if (options.json) print_json({{"removed", name}});
  return {};
}

Result<Remote> open_remote(Store& store, const std::optional<std::string>& name) {
  DELTAVM_ASSIGN_OR_RETURN(RemoteRecord record, choose_remote(store, name));
  DELTAVM_ASSIGN_OR_RETURN(S3Credentials credentials, S3Credentials::from_environment());
  return Remote::open(record, credentials);
}

Status run_push(const GlobalOptions& options, const std::string& name, const std::optional<std::string>& remote_name) {
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
  DELTAVM_ASSIGN_OR_RETURN(Remote remote, open_remote(store, remote_name));
  auto start = std::chrono::steady_clock::now();
  DELTAVM_ASSIGN_OR_RETURN(PushReport report, remote.push(store, name, ::isatty(STDERR_FILENO) != 0));
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (options.json) {
    print_json({{"template", name},
                {"remote", remote.record().name},
                {"manifests", report.manifests},
                {"objects_sent", report.objects_sent},
                {"objects_present", report.objects_present},
                {"bytes_sent", report.bytes_sent},
                {"duration_ms", ms}});
    return {};
  }
  fmt::print("pushed {} to {}: {} objects sent ({}), {} there already, {} manifests, {}\n", name, remote.record().name,
             report.objects_sent, human_bytes(report.bytes_sent), report.objects_present, report.manifests.size(),
             human_duration_ms(ms));
  return {};
}

Status run_pull(const GlobalOptions& options, const std::string& name, const std::optional<std::string>& remote_name) {
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options, StoreAccess::kCreate));
  DELTAVM_ASSIGN_OR_RETURN(Remote remote, open_remote(store, remote_name));
  auto start = std::chrono::steady_clock::now();
  DELTAVM_ASSIGN_OR_RETURN(PullReport report, remote.pull(store, name, ::isatty(STDERR_FILENO) != 0));
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  // Within the cache's bound, the template just pulled pinned with the VMs' templates.
  DELTAVM_ASSIGN_OR_RETURN(EvictReport evicted, evict_unused_cache(store, runtime_directory(options), {name}));
  if (!evicted.evicted.empty()) fmt::print(stderr, "cache: evicted {}\n", fmt::join(evicted.evicted, ", "));
  if (options.json) {
    print_json({{"template", name},
                {"evicted", evicted.evicted},
                {"remote", remote.record().name},
                {"added", report.import.added},
                {"present", report.import.present},
                {"objects_fetched", report.import.objects_fetched},
                {"bytes_fetched", report.import.bytes_fetched + report.manifest_bytes},
                {"duration_ms", ms}});
    return {};
  }
  fmt::print("pulled {} from {}: {} image(s) added, {} here already, {} objects fetched ({}), {}\n", name,
             remote.record().name, report.import.added.size(), report.import.present.size(),
             report.import.objects_fetched, human_bytes(report.import.bytes_fetched + report.manifest_bytes),
             human_duration_ms(ms));
  return {};
}

}  // namespace

void add_remote_commands(CLI::App& app, const GlobalOptions& options, int& exit_status) {
  auto finish = [&exit_status](const Status& status) { exit_status = status ? 0 : report_error(status.error()); };
  CLI::App* remote = app.add_subcommand(
      "remote",
      "Object stores (S3) the store pushes to and pulls from; credentials come from AWS_ACCESS_KEY_ID and "
      "AWS_SECRET_ACCESS_KEY or ~/.aws/credentials, never from the command line");
  remote->require_subcommand(1);

  struct AddArguments {
    std::string name, url, endpoint, region = "us-east-1";
  };
  auto add = std::make_shared<AddArguments>();
  CLI::App* add_command = remote->add_subcommand("add", "Add a remote: deltavm remote add NAME s3://BUCKET[/PREFIX]");
  add_command->add_option("NAME", add->name)->required();
  add_command->add_option("URL", add->url, "s3://BUCKET[/PREFIX]")->required();
  add_command->add_option("--endpoint", add->endpoint, "The S3 endpoint, http(s)://HOST[:PORT]")->required();
  add_command->add_option("--region", add->region, "The region requests are signed for (default us-east-1)");
  add_command->callback(
      [&options, add, finish] { finish(run_remote_add(options, add->name, add->url, add->endpoint, add->region)); });

  remote->add_subcommand("ls", "List the remotes")->callback([&options, finish] { finish(run_remote_ls(options)); });

  auto rm_name = std::make_shared<std::string>();
  CLI::App* rm_command = remote->add_subcommand("rm", "Forget a remote (nothing on it is removed)");
  rm_command->add_option("NAME", *rm_name)->required();
  rm_command->callback([&options, rm_name, finish] { finish(run_remote_rm(options, *rm_name)); });

  struct TransferArguments {
    std::string name;
    std::optional<std::string> remote;
  };
  auto push = std::make_shared<TransferArguments>();
  CLI::App* push_command =
      app.add_subcommand("push", "Upload a template's chain (the objects the remote lacks) and its manifests");
  push_command->add_option("TEMPLATE", push->name)->required();
  push_command->add_option("--remote", push->remote, "Which remote (default: the only one)");
  push_command->callback([&options, push, finish] { finish(run_push(options, push->name, push->remote)); });

  auto pull = std::make_shared<TransferArguments>();
  CLI::App* pull_command =
      app.add_subcommand("pull", "Fetch a template's chain (the objects this store lacks), verified, into the store");
  pull_command->add_option("TEMPLATE", pull->name)->required();
  pull_command->add_option("--remote", pull->remote, "Which remote (default: the only one)");
  pull_command->callback([&options, pull, finish] { finish(run_pull(options, pull->name, pull->remote)); });
}

}  // namespace deltavm::cli
