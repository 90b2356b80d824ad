#!/usr/bin/env python3
"""The running service against docs/api.yaml.

Starts `deltavm serve` on a fresh store, builds two real templates (a base and a child) through
the API, and drives every documented route: successes, bad bodies, unknown names, conflicts,
the VM limit, the TCP token and the drain on SIGTERM. Every answer is checked against the
document: its status must be one the route documents, and its body must match that response's
schema. At the end every documented route must have answered.

usage: api_conformance.py --deltavm BUILD/deltavm --api docs/api.yaml
"""
import argparse
import base64
import copy
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import warnings

import jsonschema
import yaml

warnings.filterwarnings("ignore", category=DeprecationWarning)  # RefResolver: the API Debian 12 ships.


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def openapi_to_json_schema(node):
    """OpenAPI 3.0's `nullable` as JSON Schema's type union."""
    if isinstance(node, dict):
        node = {key: openapi_to_json_schema(value) for key, value in node.items()}
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        return node
    if isinstance(node, list):
        return [openapi_to_json_schema(value) for value in node]
    return node


class Api:
    """The document, and the answers checked against it."""

    def __init__(self, path):
        with open(path) as f:
            self.document = openapi_to_json_schema(yaml.safe_load(f))
        self.routes = []
        for template, item in self.document["paths"].items():
            pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
            self.routes.append((re.compile(pattern), template, item))
        self.resolver = jsonschema.RefResolver.from_schema(self.document)
        self.answered = set()  # (template, method, status)
        self.failures = []

    def resolve(self, node):
        """A response given as {"$ref": "#/components/..."}: the object it names."""
        while isinstance(node, dict) and "$ref" in node:
            target = self.document
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            node = target
        return node

    def operations(self):
        for template, item in self.document["paths"].items():
            for method in item:
                if method in ("get", "put", "post", "delete"):
                    yield template, method

    def check(self, method, path, status, content_type, body):
        bare = path.split("?")[0]
        match = [(template, item) for pattern, template, item in self.routes if pattern.match(bare)]
        if not match:
            self.failures.append(f"{method} {path}: no documented route")
            return
        template, item = match[0]
        operation = item.get(method.lower())
        if operation is None:
            self.failures.append(f"{method} {template}: method not documented")
            return
        response = self.resolve(operation["responses"].get(str(status)))
        if response is None:
            self.failures.append(f"{method} {template}: status {status} not documented; body {body[:300]!r}")
            return
        self.answered.add((template, method.lower(), status))
        content = response.get("content")
        if content is None:
            if body:
                self.failures.append(f"{method} {template} {status}: documented without a body, got {body[:200]!r}")
            return
        media = content_type.split(";")[0].strip()
        if media not in content:
            self.failures.append(f"{method} {template} {status}: content type {content_type!r} not documented")
            return
        schema = content[media]["schema"]
        if media == "application/json":
            try:
                value = json.loads(body)
            except ValueError as error:
                self.failures.append(f"{method} {template} {status}: body is not JSON ({error}): {body[:200]!r}")
                return
        else:
            value = body.decode("utf-8", errors="replace")
        try:
            jsonschema.validate(value, schema, resolver=self.resolver)
        except jsonschema.ValidationError as error:
            self.failures.append(f"{method} {template} {status}: {error.message} at {list(error.absolute_path)}")


class Client:
    def __init__(self, api, socket_path=None, tcp=None, token=None):
        self.api, self.socket_path, self.tcp, self.token = api, socket_path, tcp, token

    def call(self, method, path, body=None, raw=None, timeout=300):
        if self.socket_path:
            connection = UnixConnection(self.socket_path, timeout)
        else:
            host, port = self.tcp.rsplit(":", 1)
            connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
        headers = {}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            headers["Content-Type"] = "application/json"
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        self.api.check(method, path, response.status, response.getheader("Content-Type", ""), payload)
        try:
            value = json.loads(payload) if payload and "json" in response.getheader("Content-Type", "") else payload
        except ValueError:
            value = payload
        return response.status, value


def expect(condition, message):
    if not condition:
        raise AssertionError(message)


def expect_status(answer, status, what):
    expect(answer[0] == status, f"{what}: expected {status}, got {answer[0]}: {answer[1]!r}")
    return answer[1]


def wait_for(what, predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def build(client, spec):
    body = expect_status(client.call("POST", "/v1/templates", {"spec": spec}), 202, f"build {spec['name']}")
    build_id = body["build_id"]
    final = wait_for(f"build {build_id}",
                     lambda: (lambda b: b if b["state"] != "building" else None)(
                         expect_status(client.call("GET", f"/v1/builds/{build_id}"), 200, "build state")),
                     600)
    expect(final["state"] == "succeeded", f"build {spec['name']} failed: {final}")
    return build_id


def vm_directories(runtime):
    directory = os.path.join(runtime, "vms")
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def run(arguments, root):
    api = Api(arguments.api)
    store, runtime = os.path.join(root, "store"), os.path.join(root, "run")
    config = os.path.join(root, "serve.json")
    with open(config, "w") as f:
        json.dump({"max_vms": 3}, f)
    token = "conformance-token-0123456789abcdef"
    token_file = os.path.join(root, "token")
    with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(token + "\n")
    environment = dict(os.environ, DELTAVM_STORE=store, DELTAVM_RUNTIME=runtime)
    service = subprocess.Popen([arguments.deltavm, "--json", "serve", "--config", config, "--listen", "127.0.0.1:0",
                                "--token-file", token_file], env=environment, stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or lines[-1] != "}\n":
            line = service.stdout.readline()
            expect(line, f"deltavm serve ended before it served (status {service.poll()})")
            lines.append(line)
        started = json.loads("".join(lines))
        client = Client(api, socket_path=started["socket"])
        tcp = Client(api, tcp=started["tcp"], token=token)
        stranger = Client(api, tcp=started["tcp"])
        wrong = Client(api, tcp=started["tcp"], token="x" * len(token))
        expect(oct(os.stat(started["socket"]).st_mode & 0o777) == "0o600", "the socket is not mode 0600")

        # Bytes that are not HTTP, and a request line and header past any sane size, are
        # answered or dropped; the service keeps serving.
        for garbage in [bytes(range(256)) * 64 + b"\r\n\r\n", b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\n\r\n",
                        b"POST /v1/vms HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n{}"]:
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.settimeout(30)
            raw.connect(started["socket"])
            try:
                raw.sendall(garbage)
                raw.shutdown(socket.SHUT_WR)
                while raw.recv(65536):
                    pass
            except OSError:
                pass  # The service may close on us mid-send: that is a fine answer to garbage.
            raw.close()
        expect(service.poll() is None, "deltavm serve died on garbage")
        expect_status(client.call("GET", "/healthz"), 200, "healthz")
        metrics = expect_status(client.call("GET", "/metrics"), 200, "metrics")
        expect(b"# TYPE deltavm_load_seconds histogram" in metrics, "metrics lack the load histogram")
        expect_status(tcp.call("GET", "/healthz"), 200, "healthz over TCP with the token")
        # Every route refuses TCP requests without the right token, before anything runs.
        for template, method in api.operations():
            path = template.replace("{name}", "base").replace("{id}", "0")
            expect_status(stranger.call(method.upper(), path, {}), 401, f"{method} {template} without token")
            expect_status(wrong.call(method.upper(), path, {}), 401, f"{method} {template} with a wrong token")

        # Templates, built through the API.
        for raw, field in [(b"not json", "JSON"), (b"[1]", "object")]:
            message = expect_status(client.call("POST", "/v1/templates", raw=raw), 400, "build, bad JSON")
            expect(field in message["error"]["message"], message)
        for body, field in [({}, "spec"), ({"spec": {"name": "x"}, "colour": 1}, "colour"),
                            ({"spec": {"name": "x", "memory_mib": "lots"}}, "memory_mib"),
                            ({"spec": {"name": "x", "files": [{"source": "rel", "destination": "/a"}]}}, "source"),
                            ({"spec": {"name": "x"}, "backend": "vmware"}, "backend")]:
            message = expect_status(client.call("POST", "/v1/templates", body), 400, f"build {body}")
            expect(field in message["error"]["message"], f"the error does not name {field}: {message}")
        base_spec = {"name": "base", "memory_mib": 128}
        answer = client.call("POST", "/v1/templates", {"spec": base_spec})
        build_id = expect_status(answer, 202, "build base")["build_id"]
        expect_status(client.call("POST", "/v1/templates", {"spec": base_spec}), 409, "a second build of base")
        wait_for("base", lambda: client.call("GET", f"/v1/builds/{build_id}")[1]["state"] != "building", 600)
        expect(client.call("GET", f"/v1/builds/{build_id}")[1]["state"] == "succeeded", "base failed to build")
        expect_status(client.call("POST", "/v1/templates", {"spec": base_spec}), 409, "base again")
        build(client, {"name": "web", "parent": "base", "memory_mib": 128,
                       "setup": ["echo hello-from-web > /tmp/page"]})
        expect_status(client.call("GET", "/v1/builds/zzz"), 404, "unknown build")
        templates = expect_status(client.call("GET", "/v1/templates"), 200, "templates")["templates"]
        expect(sorted(t["name"] for t in templates) == ["base", "web"], templates)
        web = expect_status(client.call("GET", "/v1/templates/web"), 200, "template web")
        expect(web["chain"] == ["base", "web"] and web["parent"] == "base", web)
        expect_status(client.call("GET", "/v1/templates/nope"), 404, "unknown template")

        # A warm pool of web.
        for body in [{"size": -1}, {"size": "2"}, {"size": 100000}, {}, {"size": 1, "extra": True}]:
            expect_status(client.call("PUT", "/v1/templates/web/pool", body), 400, f"pool {body}")
        expect_status(client.call("PUT", "/v1/templates/nope/pool", {"size": 1}), 404, "pool of an unknown template")
        expect_status(client.call("PUT", "/v1/templates/web/pool", {"size": 1}), 200, "pool size 1")
        wait_for("the pool", lambda: client.call("GET", "/v1/templates/web")[1]["pool"]["ready"] == 1, 300)

        # Bad VM requests start nothing.
        before = vm_directories(runtime)
        for body, status, field in [({}, 400, "template"), ({"template": 5}, 400, "template"),
                                    ({"template": "web", "ttl_seconds": -1}, 400, "ttl_seconds"),
                                    ({"template": "web", "ttl_seconds": 10**15}, 400, "ttl_seconds"),
                                    ({"template": "web", "ttl_seconds": 1.5}, 400, "ttl_seconds"),
                                    ({"template": "web", "cpus": 64}, 400, "cpus"),
                                    ({"template": "web", "backend": "vmware"}, 400, "backend"),
                                    ({"template": "web", "ram": "sideways"}, 400, "ram"),
                                    ({"template": "nope"}, 404, "nope")]:
            message = expect_status(client.call("POST", "/v1/vms", body), status, f"create {body}")
            expect(field in message["error"]["message"], f"the error does not name {field}: {message}")
        expect_status(client.call("POST", "/v1/vms", raw=b"{\"template\": "), 400, "create, truncated JSON")
        expect(vm_directories(runtime) == before, "a refused request left a VM behind")

        # VMs: one from the pool, one loaded cold.
        pooled = expect_status(client.call("POST", "/v1/vms", {"template": "web", "ttl_seconds": 600}), 201, "pooled")
        expect(pooled["pooled"] and pooled["expires_at_unix"] > 0, pooled)
        cold = expect_status(client.call("POST", "/v1/vms", {"template": "web", "ram": "flat"}), 201, "cold")
        expect(not cold["pooled"], cold)
        listed = expect_status(client.call("GET", "/v1/vms"), 200, "vms")["vms"]
        expect(sorted(v["id"] for v in listed) == sorted([pooled["id"], cold["id"]]), listed)
        expect_status(client.call("GET", f"/v1/vms/{pooled['id']}"), 200, "vm")
        expect_status(client.call("GET", "/v1/vms/ffff"), 404, "unknown vm")

        # The limit: 3 VMs, the refilled pool VM included; the pool gives way, then 429.
        wait_for("the pool to refill", lambda: client.call("GET", "/v1/templates/web")[1]["pool"]["ready"] == 1, 300)
        third = expect_status(client.call("POST", "/v1/vms", {"template": "base"}), 201, "third VM")
        before = vm_directories(runtime)
        message = expect_status(client.call("POST", "/v1/vms", {"template": "base"}), 429, "past max_vms")
        expect("3" in message["error"]["message"], message)
        expect(vm_directories(runtime) == before, "a refused request left a VM behind")
        expect_status(client.call("DELETE", f"/v1/vms/{third['id']}"), 204, "delete third")
        expect_status(client.call("DELETE", f"/v1/vms/{third['id']}"), 404, "delete third again")

        # exec
        vm = pooled["id"]
        result = expect_status(client.call("POST", f"/v1/vms/{vm}/exec", {"command": ["cat", "/tmp/page"]}), 200, "exec")
        expect(result["stdout"] == "hello-from-web\n" and result["exit_code"] == 0, result)
        every_byte = bytes(range(256)) * 4
        result = expect_status(client.call("POST", f"/v1/vms/{vm}/exec", {
            "command": ["cat"], "encoding": "base64", "stdin": base64.b64encode(every_byte).decode()}), 200, "exec cat")
        expect(base64.b64decode(result["stdout"]) == every_byte, "binary stdin/stdout did not round-trip")
        result = expect_status(client.call("POST", f"/v1/vms/{vm}/exec", {
            "command": ["sh", "-c", "printf 'a\\377b'; echo oops >&2; exit 3"]}), 200, "exec lossy")
        expect(result["lossy"] and result["exit_code"] == 3 and result["stderr"] == "oops\n", result)
        result = expect_status(client.call("POST", f"/v1/vms/{vm}/exec", {
            "command": ["head", "-c", "5000", "/dev/zero"], "max_output_bytes": 100}), 200, "exec truncated")
        expect(result["stdout_truncated"] and len(result["stdout"]) == 100, result)
        result = expect_status(client.call("POST", f"/v1/vms/{vm}/exec", {
            "command": ["sleep", "30"], "timeout_seconds": 1}), 200, "exec timeout")
        expect(result["timed_out"] and result["exit_code"] == 137, result)
        for body, field in [({"command": "ls"}, "command"), ({"command": []}, "command"), ({"command": [1]}, "command"),
                            ({"command": ["ls"], "timeout_seconds": 0}, "timeout_seconds"),
                            ({"command": ["ls"], "timeout_seconds": 10**9}, "timeout_seconds"),
                            ({"command": ["ls"], "encoding": "rot13"}, "encoding"),
                            ({"command": ["ls"], "encoding": "base64", "stdin": "!!"}, "stdin"),
                            ({"command": ["ls"], "max_output_bytes": -5}, "max_output_bytes"),
                            ({"command": ["ls"], "user": "root"}, "user")]:
            message = expect_status(client.call("POST", f"/v1/vms/{vm}/exec", body), 400, f"exec {body}")
            expect(field in message["error"]["message"], f"the error does not name {field}: {message}")
        expect_status(client.call("POST", "/v1/vms/ffff/exec", {"command": ["ls"]}), 404, "exec, unknown vm")

        # console
        client.call("POST", f"/v1/vms/{vm}/exec", {"command": ["sh", "-c", "echo console-marker > /dev/console"]})
        console = expect_status(client.call("GET", f"/v1/vms/{vm}/console"), 200, "console")
        expect("console-marker" in console["output"], f"the console lacks what the guest wrote: {console}")
        expect_status(client.call("GET", f"/v1/vms/{vm}/console?encoding=base64"), 200, "console base64")
        expect_status(client.call("GET", f"/v1/vms/{vm}/console?encoding=ebcdic"), 400, "console, bad encoding")
        expect_status(client.call("GET", "/v1/vms/ffff/console"), 404, "console, unknown vm")

        # A snapshot of the cold VM, which stops it; its clone has what it wrote after the load.
        expect_status(client.call("POST", f"/v1/vms/{cold['id']}/exec", {
            "command": ["sh", "-c", "echo written-after-load > /tmp/after"]}), 200, "exec before snapshot")
        snapshot = expect_status(client.call("POST", f"/v1/vms/{cold['id']}/snapshots", {"name": "web-snap", "stop": True}),
                                 201, "snapshot")
        expect(snapshot["parent"] == "web" and snapshot["changed_pages"] > 0, snapshot)
        expect_status(client.call("GET", f"/v1/vms/{cold['id']}"), 404, "the snapshotted VM, stopped")
        expect(expect_status(client.call("GET", "/v1/templates/web-snap"), 200, "snapshot template")["parent"] == "web",
               "the snapshot is not stored against web")
        clone = expect_status(client.call("POST", "/v1/vms", {"template": "web-snap"}), 201, "clone of the snapshot")
        result = expect_status(client.call("POST", f"/v1/vms/{clone['id']}/exec", {"command": ["cat", "/tmp/after"]}),
                               200, "exec in the clone")
        expect(result["stdout"] == "written-after-load\n", result)
        expect_status(client.call("POST", f"/v1/vms/{vm}/snapshots", {"name": "web-snap"}), 409, "snapshot, name taken")
        expect_status(client.call("POST", "/v1/vms/ffff/snapshots", {"name": "other"}), 404, "snapshot, unknown vm")
        for body, field in [({}, "name"), ({"name": "bad name!"}, "name"), ({"name": 5}, "name"),
                            ({"name": "x", "stop": "yes"}, "stop"), ({"name": "x", "keep": 1}, "keep")]:
            message = expect_status(client.call("POST", f"/v1/vms/{vm}/snapshots", body), 400, f"snapshot {body}")
            expect(field in message["error"]["message"], f"the error does not name {field}: {message}")

        # Pause and resume under the same id; fork.
        paused = expect_status(client.call("POST", f"/v1/vms/{clone['id']}/pause"), 200, "pause")
        expect(paused["template"].startswith(f"paused-{clone['id']}-"), paused)
        state = expect_status(client.call("GET", f"/v1/vms/{clone['id']}"), 200, "a paused VM")
        expect(state["state"] == "paused" and state["pid"] == 0, state)
        listed = expect_status(client.call("GET", "/v1/vms"), 200, "vms with a paused one")["vms"]
        expect([v["state"] for v in listed if v["id"] == clone["id"]] == ["paused"], listed)
        expect_status(client.call("POST", f"/v1/vms/{clone['id']}/exec", {"command": ["true"]}), 404, "exec, paused")
        resumed = expect_status(client.call("POST", f"/v1/vms/{clone['id']}/resume"), 200, "resume")
        expect(resumed["id"] == clone["id"] and resumed["state"] == "running", resumed)
        result = expect_status(client.call("POST", f"/v1/vms/{clone['id']}/exec", {"command": ["cat", "/tmp/after"]}),
                               200, "exec after resume")
        expect(result["stdout"] == "written-after-load\n", result)
        expect_status(client.call("POST", f"/v1/vms/{clone['id']}/resume"), 409, "resume a running VM")
        expect_status(client.call("POST", "/v1/vms/ffff/pause"), 404, "pause, unknown vm")
        expect_status(client.call("POST", "/v1/vms/ffff/resume"), 404, "resume, unknown vm")
        forked = expect_status(client.call("POST", f"/v1/vms/{clone['id']}/fork", {"count": 1}), 201, "fork")
        expect(len(forked["vms"]) == 1, forked)
        fork_id, fork_template = forked["vms"][0]["id"], forked["snapshot"]["template"]
        result = expect_status(client.call("POST", f"/v1/vms/{fork_id}/exec", {"command": ["cat", "/tmp/after"]}),
                               200, "exec in the fork")
        expect(result["stdout"] == "written-after-load\n", result)
        for body, field in [({"count": 0}, "count"), ({"count": 65}, "count"), ({"count": "2"}, "count"),
                            ({"count": 1, "name": "x"}, "name")]:
            message = expect_status(client.call("POST", f"/v1/vms/{clone['id']}/fork", body), 400, f"fork {body}")
            expect(field in message["error"]["message"], f"the error does not name {field}: {message}")
        expect_status(client.call("POST", "/v1/vms/ffff/fork", {}), 404, "fork, unknown vm")
        expect_status(client.call("DELETE", f"/v1/vms/{fork_id}"), 204, "delete the fork")
        expect_status(client.call("GET", f"/v1/templates/{fork_template}"), 404, "the fork's image, gone with it")
        expect_status(client.call("DELETE", "/v1/templates/web?cascade=maybe"), 400, "delete, bad cascade")

        # Templates in use cannot be deleted.
        expect_status(client.call("DELETE", "/v1/templates/web"), 409, "delete web while VMs run from it")
        expect_status(client.call("DELETE", "/v1/templates/base"), 409, "delete base, web's parent")
        expect_status(client.call("DELETE", "/v1/templates/nope"), 404, "delete an unknown template")
        for id in (pooled["id"], clone["id"]):
            expect_status(client.call("DELETE", f"/v1/vms/{id}"), 204, f"delete {id}")
        expect_status(client.call("DELETE", "/v1/templates/web"), 409, "delete web, web-snap's parent")
        removed = expect_status(client.call("DELETE", "/v1/templates/web-snap"), 200, "delete the snapshot")
        expect(removed["removed"] == ["web-snap"], removed)
        expect_status(client.call("DELETE", "/v1/templates/web"), 409, "delete web while it has a pool")
        expect_status(client.call("PUT", "/v1/templates/web/pool", {"size": 0}), 200, "pool size 0")
        wait_for("the pool to empty", lambda: client.call("DELETE", "/v1/templates/web")[0] == 200, 120)
        expect_status(client.call("GET", "/v1/templates/web"), 404, "web, deleted")
        text = expect_status(client.call("GET", "/metrics"), 200, "metrics").decode()
        expect(re.search(r'deltavm_loads_total\{[^}]*pooled="true"[^}]*\} 1', text), text)
        expect(re.search(r'deltavm_errors_total\{code="limit"\} 1', text), text)

        # SIGTERM drains: the exec in flight finishes, new work gets 503, the service exits 0 and
        # the user VM is left running for the next service.
        last = expect_status(client.call("POST", "/v1/vms", {"template": "base"}), 201, "VM for the drain")
        finished = {}
        slow = threading.Thread(target=lambda: finished.update(answer=client.call(
            "POST", f"/v1/vms/{last['id']}/exec", {"command": ["sh", "-c", "sleep 3; echo drained"]})))
        slow.start()
        time.sleep(1)
        service.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        expect_status(client.call("GET", "/healthz"), 503, "healthz while draining")
        expect_status(client.call("POST", "/v1/vms", {"template": "base"}), 503, "create while draining")
        slow.join()
        expect(finished["answer"][0] == 200 and finished["answer"][1]["stdout"] == "drained\n", finished)
        expect(service.wait(60) == 0, f"deltavm serve exited {service.returncode} after SIGTERM")
        expect(vm_directories(runtime) == [last["id"]], f"after the drain: {vm_directories(runtime)}")
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        subprocess.run([arguments.deltavm, "stop", "--all"], env=environment, stdout=subprocess.DEVNULL)

    missing = [f"{method.upper()} {template}" for template, method in api.operations()
               if not any(a[0] == template and a[1] == method and 200 <= a[2] < 300 for a in api.answered)]
    expect(not missing, f"documented routes never answered with success: {missing}")
    expect(not api.failures, "answers that do not match docs/api.yaml:\n  " + "\n  ".join(api.failures))
    print(f"{len(api.answered)} (route, method, status) answers matched docs/api.yaml")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deltavm", required=True)
    parser.add_argument("--api", required=True)
    arguments = parser.parse_args()
    root = tempfile.mkdtemp(prefix="deltavm_api_")
    try:
        run(arguments, root)
    except AssertionError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
