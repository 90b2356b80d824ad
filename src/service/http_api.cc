#include "service/http_api.h"

#include <httplib.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include <functional>

#include "base/json_fields.h"
#include "base/socket.h"
#include "service/encoding.h"
#include "service/request_body.h"

namespace deltavm {
namespace {

using nlohmann::json;

struct Reply {
  int status = 200;
  json body;  // Sent as JSON unless `text` is set.
  std::optional<std::string> text;
  std::string content_type = "application/json";
};

int http_status(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument:
    case ErrorCode::kUnsupported: return 400;
    case ErrorCode::kNotFound: return 404;
    case ErrorCode::kAlreadyExists:
    case ErrorCode::kConflict:
    case ErrorCode::kBusy: return 409;
    case ErrorCode::kLimit: return 429;
    case ErrorCode::kUnavailable: return 503;
    case ErrorCode::kCorruption:
    case ErrorCode::kIo: return 500;
  }
  return 500;
}

Reply error_reply(int status, std::string_view code, std::string_view message) {
  return Reply{status, json{{"error", {{"code", code}, {"message", message}}}}};
}

Reply error_reply(const Error& error) {
  return error_reply(http_status(error.code), error_code_id(error.code), error.message);
}

// Bytes for a JSON string in `encoding`; with "utf-8", bytes that are not UTF-8 are replaced
// (U+FFFD) and `lossy` is set.
std::string encode_bytes(const std::string& bytes, const std::string& encoding, bool& lossy) {
  if (encoding == "base64") return base64_encode(bytes);
  if (valid_utf8(bytes)) return bytes;
  lossy = true;
  std::string replaced = json(bytes).dump(-1, ' ', false, json::error_handler_t::replace);
  return json::parse(replaced).get<std::string>();
}

json vm_json(const VmView& vm) {
  return {{"id", vm.id},
          {"state", vm.state},
          {"template", vm.template_name},
          {"backend", vm.backend},
          {"pooled", vm.pooled},
          {"pid", vm.pid},
          {"memory_bytes", vm.memory_bytes},
          {"created_at_unix", vm.created_at_unix},
          {"expires_at_unix", vm.expires_at_unix},
          {"timings",
           {{"total_ms", vm.timings.total_ms},
            {"prepare_ms", vm.timings.prepare_ms},
            {"launch_ms", vm.timings.launch_ms},
            {"fill_ms", vm.timings.fill_ms},
            {"state_ms", vm.timings.state_ms},
            {"resume_ms", vm.timings.resume_ms},
            {"identity_ms", vm.timings.identity_ms}}}};
}

json pool_json(const PoolView& pool) {
  return {{"size", pool.size}, {"ready", pool.ready}, {"loading", pool.loading}, {"last_error", pool.last_error}};
}

json template_json(const TemplateView& view) {
  return {{"name", view.name},
          {"parent", view.parent ? json(*view.parent) : json()},
          {"chain", view.chain},
          {"chain_depth", view.chain_depth},
          {"image_size_bytes", view.image_size_bytes},
          {"stored_size_bytes", view.stored_size_bytes},
          {"chain_stored_bytes", view.chain_stored_bytes},
          {"backend", view.backend},
          {"memory_bytes", view.memory_bytes},
          {"vcpus", view.vcpus},
          {"pool", pool_json(view.pool)}};
}

json build_json(const BuildView& build) {
  return {{"id", build.id},
          {"template", build.template_name},
          {"state", build.state},
          {"log", build.log},
          {"error", build.error},
          {"started_at_unix", build.started_at_unix},
          {"duration_ms", build.duration_ms}};
}

}  // namespace

// One httplib server on a listening socket of ours: httplib 0.11 binds only TCP itself, so the
// socket (Unix or TCP) is made here and handed to it.
class HttpApi::Listener : public httplib::Server {
 public:
  // Serves on `listener`, or on the socket bind_to_port made if it is not valid.
  void serve_on(Fd listener) {
    if (listener.valid()) svr_sock_ = listener.release();
    thread_ = std::thread([this] { listen_after_bind(); });
  }
  void stop_and_join() {
    stop();
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::thread thread_;
};

HttpApi::HttpApi(VmService& service) : service_(service) {
  service_.metrics().declare("deltavm_http_requests_total", "counter", "HTTP requests answered, by route and status");
}

HttpApi::~HttpApi() { stop(); }

void HttpApi::stop() {
  for (auto& listener : listeners_) listener->stop_and_join();
}

Status HttpApi::listen_unix(const std::filesystem::path& path) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, deltavm::listen_unix(path));
  // The socket is its owner's alone, whatever the umask (the runtime directory is too).
  if (::chmod(path.c_str(), 0600) != 0) return errno_error(fmt::format("chmod {}", path.string()), errno);
  auto listener = std::make_unique<Listener>();
  install_routes(*listener, std::nullopt);
  listener->serve_on(std::move(fd));
  listeners_.push_back(std::move(listener));
  return {};
}

Result<int> HttpApi::listen_tcp(const std::string& host, int port, std::string token) {
  if (token.empty()) return make_error(ErrorCode::kInvalidArgument, "a TCP listener needs a token");
  auto listener = std::make_unique<Listener>();
  int bound = port == 0 ? listener->bind_to_any_port(host) : (listener->bind_to_port(host, port) ? port : -1);
  if (bound < 0) return make_error(ErrorCode::kIo, "cannot listen on {}:{}", host, port);
  install_routes(*listener, std::move(token));
  Listener* raw = listener.get();
  listeners_.push_back(std::move(listener));
  raw->serve_on(Fd());  // Already bound by httplib: keep its socket.
  return bound;
}

void HttpApi::install_routes(Listener& server, std::optional<std::string> token) {
  server.new_task_queue = [] { return new httplib::ThreadPool(32); };
  server.set_payload_max_length(kMaxRequestBodyBytes);
  server.set_read_timeout(30, 0);
  server.set_write_timeout(30, 0);
  server.set_keep_alive_timeout(10);

  auto send = [](httplib::Response& response, const Reply& reply) {
    response.status = reply.status;
    if (reply.text) {
      response.set_content(*reply.text, reply.content_type);
    } else if (reply.status != 204) {
      response.set_content(dump_json(reply.body), "application/json");
    }
  };
  if (token) {
    server.set_pre_routing_handler(
        [token = *token, send](const httplib::Request& request, httplib::Response& response) {
          std::string expected = "Bearer " + token;
          std::string given = request.get_header_value("Authorization");
          // Compared in time independent of where they differ.
          unsigned difference = given.size() != expected.size();
          for (size_t i = 0; i < given.size() && i < expected.size(); ++i) difference |= given[i] ^ expected[i];
          if (difference == 0) return httplib::Server::HandlerResponse::Unhandled;
          send(response, error_reply(401, "unauthorized", "this port needs the header Authorization: Bearer TOKEN"));
          response.set_header("WWW-Authenticate", "Bearer");
          return httplib::Server::HandlerResponse::Handled;
        });
  }
  server.set_error_handler([send](const httplib::Request& request, httplib::Response& response) {
    if (!response.body.empty()) return;
    if (response.status == 404) {
      send(response, error_reply(404, "not_found", fmt::format("no route {} {}", request.method, request.path)));
    } else if (response.status == 413) {
      send(response, error_reply(413, "invalid_argument",
                                 fmt::format("request body larger than {} bytes", kMaxRequestBodyBytes)));
    } else {
      send(response, error_reply(response.status, "invalid_argument", "bad request"));
    }
  });
  server.set_exception_handler(
      [send](const httplib::Request&, httplib::Response& response, std::exception_ptr exception) {
        std::string what = "unknown";
        try {
          std::rethrow_exception(std::move(exception));
        } catch (const std::exception& error) {
          what = error.what();
        } catch (...) {
        }
        send(response, error_reply(500, "io", fmt::format("internal error: {}", what)));
      });

  using Action = std::function<Reply(const httplib::Request&)>;
  auto route = [this, send](const std::string& name, Action action) {
    return
        [this, send, name, action = std::move(action)](const httplib::Request& request, httplib::Response& response) {
          ++in_flight_;
          struct Done {
            std::atomic<int>& count;
            ~Done() { --count; }
          } done{in_flight_};
          Reply reply = action(request);
          if (reply.status >= 400 && !reply.text) {
            service_.metrics().add("deltavm_errors_total", {{"code", reply.body["error"]["code"].get<std::string>()}});
          }
          service_.metrics().add("deltavm_http_requests_total",
                                 {{"route", name}, {"status", std::to_string(reply.status)}});
          send(response, reply);
        };
  };
  auto with_body = [](const httplib::Request& request, const std::function<Reply(const json&)>& action) {
    Result<json> body = parse_request_body(request.body);
    if (!body) return error_reply(body.error());
    return action(*body);
  };
  VmService& service = service_;
  const std::string vm = R"(/v1/vms/([0-9a-f]{1,16}))";
  const std::string name = R"(/v1/templates/([A-Za-z0-9._-]{1,64}))";

  server.Get("/healthz", route("healthz", [&service](const httplib::Request&) {
               if (service.draining()) return error_reply(503, "unavailable", "the service is shutting down");
               return Reply{200, json{{"status", "ok"}}};
             }));
  server.Get("/metrics", route("metrics", [&service](const httplib::Request&) {
               return Reply{200, json(), service.metrics_text(), "text/plain; version=0.0.4"};
             }));

  server.Get("/v1/templates", route("templates", [&service](const httplib::Request&) {
               Result<std::vector<TemplateView>> templates = service.list_templates();
               if (!templates) return error_reply(templates.error());
               json list = json::array();
               for (const TemplateView& view : *templates) list.push_back(template_json(view));
               return Reply{200, json{{"templates", list}}};
             }));
  server.Get(name, route("template", [&service](const httplib::Request& request) {
               Result<TemplateView> view = service.get_template(request.matches[1]);
               return view ? Reply{200, template_json(*view)} : error_reply(view.error());
             }));
  server.Post("/v1/templates", route("templates", [&service, with_body](const httplib::Request& request) {
                return with_body(request, [&](const json& body) {
                  Result<BuildBody> parsed = parse_build(body);
                  if (!parsed) return error_reply(parsed.error());
                  Result<std::string> id = service.start_build(parsed->spec, parsed->backend);
                  if (!id) return error_reply(id.error());
                  return Reply{202, json{{"build_id", *id}, {"template", parsed->spec.name}, {"state", "building"}}};
                });
              }));
  server.Delete(
      name, route("template", [&service](const httplib::Request& request) {
        std::string cascade = request.has_param("cascade") ? request.get_param_value("cascade") : "false";
        if (cascade != "true" && cascade != "false") {
          return error_reply(400, "invalid_argument",
                             fmt::format("query parameter cascade must be true or false, found {:?}", cascade));
        }
        Result<std::vector<std::string>> removed = service.delete_template(request.matches[1], cascade == "true");
        return removed ? Reply{200, json{{"removed", *removed}}} : error_reply(removed.error());
      }));
  server.Put(name + "/pool", route("pool", [&service, with_body](const httplib::Request& request) {
               return with_body(request, [&](const json& body) {
                 Result<uint64_t> size = parse_pool_size(body);
                 if (!size) return error_reply(size.error());
                 Status set = service.set_pool_size(request.matches[1], *size);
                 if (!set) return error_reply(set.error());
                 Result<TemplateView> view = service.get_template(request.matches[1]);
                 return view ? Reply{200, pool_json(view->pool)} : error_reply(view.error());
               });
             }));
  server.Get(R"(/v1/builds/([A-Za-z0-9]{1,32}))", route("build", [&service](const httplib::Request& request) {
               Result<BuildView> build = service.get_build(request.matches[1]);
               return build ? Reply{200, build_json(*build)} : error_reply(build.error());
             }));

  server.Post("/v1/vms", route("vms", [&service, with_body](const httplib::Request& request) {
                return with_body(request, [&](const json& body) {
                  Result<CreateVmRequest> parsed = parse_create_vm(body);
                  if (!parsed) return error_reply(parsed.error());
                  Result<VmView> created = service.create_vm(*parsed);
                  return created ? Reply{201, vm_json(*created)} : error_reply(created.error());
                });
              }));
  server.Get("/v1/vms", route("vms", [&service](const httplib::Request&) {
               json list = json::array();
               for (const VmView& view : service.list_vms()) list.push_back(vm_json(view));
               return Reply{200, json{{"vms", list}}};
             }));
  server.Get(vm, route("vm", [&service](const httplib::Request& request) {
               Result<VmView> view = service.describe_vm(request.matches[1]);
               return view ? Reply{200, vm_json(*view)} : error_reply(view.error());
             }));
  server.Delete(vm, route("vm", [&service](const httplib::Request& request) {
                  Status deleted = service.delete_vm(request.matches[1]);
                  return deleted ? Reply{204} : error_reply(deleted.error());
                }));
  server.Post(vm + "/exec", route("exec", [&service, with_body](const httplib::Request& request) {
                return with_body(request, [&](const json& body) {
                  Result<ExecBody> parsed = parse_exec(body);
                  if (!parsed) return error_reply(parsed.error());
                  Result<ExecResult> result = service.exec(request.matches[1], parsed->request);
                  if (!result) return error_reply(result.error());
                  bool lossy = false;
                  json reply = {{"encoding", parsed->encoding},
                                {"stdout", encode_bytes(result->stdout_bytes, parsed->encoding, lossy)},
                                {"stderr", encode_bytes(result->stderr_bytes, parsed->encoding, lossy)},
                                {"exit_code", result->exit_status},
                                {"signal", result->signal},
                                {"timed_out", result->timed_out},
                                {"stdout_truncated", result->stdout_truncated},
                                {"stderr_truncated", result->stderr_truncated},
                                {"duration_ms", result->duration_ms}};
                  reply["lossy"] = lossy;
                  return Reply{200, reply};
                });
              }));
  server.Post(vm + "/snapshots", route("snapshots", [&service, with_body](const httplib::Request& request) {
                return with_body(request, [&](const json& body) {
                  Result<SnapshotBody> parsed = parse_snapshot(body);
                  if (!parsed) return error_reply(parsed.error());
                  Result<Snapshot> taken = service.snapshot(request.matches[1], parsed->name, parsed->stop);
                  return taken ? Reply{201, snapshot_json(*taken)} : error_reply(taken.error());
                });
              }));
  server.Post(vm + "/pause", route("pause", [&service](const httplib::Request& request) {
                Result<Snapshot> paused = service.pause(request.matches[1]);
                return paused ? Reply{200, snapshot_json(*paused)} : error_reply(paused.error());
              }));
  server.Post(vm + "/resume", route("resume", [&service](const httplib::Request& request) {
                Result<VmView> resumed = service.resume(request.matches[1]);
                return resumed ? Reply{200, vm_json(*resumed)} : error_reply(resumed.error());
              }));
  server.Post(vm + "/fork", route("fork", [&service, with_body](const httplib::Request& request) {
                return with_body(request, [&](const json& body) {
                  Result<uint64_t> count = parse_fork(body);
                  if (!count) return error_reply(count.error());
                  Result<VmService::Forked> forked = service.fork(request.matches[1], *count);
                  if (!forked) return error_reply(forked.error());
                  json vms = json::array();
                  for (const VmView& view : forked->vms) vms.push_back(vm_json(view));
                  return Reply{201, json{{"snapshot", snapshot_json(forked->snapshot)}, {"vms", vms}}};
                });
              }));
  server.Get(vm + "/console", route("console", [&service](const httplib::Request& request) {
               std::string encoding = request.has_param("encoding") ? request.get_param_value("encoding") : "utf-8";
               if (encoding != "utf-8" && encoding != "base64") {
                 return error_reply(
                     400, "invalid_argument",
                     fmt::format("query parameter encoding must be utf-8 or base64, found {:?}", encoding));
               }
               Result<ConsoleOutput> output = service.console(request.matches[1]);
               if (!output) return error_reply(output.error());
               bool lossy = false;
               json reply = {{"encoding", encoding},
                             {"output", encode_bytes(output->bytes, encoding, lossy)},
                             {"dropped_bytes", output->dropped_bytes}};
               reply["lossy"] = lossy;
               return Reply{200, reply};
             }));
}

}  // namespace deltavm
