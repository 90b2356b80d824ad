#!/usr/bin/env bash
# A real S3-compatible object store on this machine: a one-node OpenStack Swift (account,
# container and object servers, a proxy with the s3api middleware, memcached for tempauth),
# bound to 127.0.0.1, for the tests, CI and the demo. It checks SigV4 signatures.
#
#   scripts/object-store.sh start [DIR]   start it (data, configuration, logs and pids in DIR)
#   scripts/object-store.sh env [DIR]     print its settings as shell exports
#   scripts/object-store.sh stop [DIR]    stop every process start began, and remove DIR
#   scripts/object-store.sh restart [DIR] stop whatever an earlier start left in DIR, then start
#
# DIR defaults to $DELTAVM_OBJECT_STORE_DIR, else /tmp/deltavm-object-store. The proxy listens
# on $DELTAVM_OBJECT_STORE_PORT if set, else a free port; the other servers on free ports. The
# servers see DIR/etc as /etc/swift through a mount namespace of their own, so nothing under
# /etc is touched. `env` prints DELTAVM_S3_ENDPOINT, AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY (a fresh secret per start), AWS_DEFAULT_REGION and
# DELTAVM_S3_BUCKET_HINT (a bucket name the caller may create).
set -euo pipefail

command=${1:-}
dir=${2:-${DELTAVM_OBJECT_STORE_DIR:-/tmp/deltavm-object-store}}

usage() {
  echo "usage: $0 start|restart|env|stop [DIR]" >&2
  exit 2
}

# A TCP port on 127.0.0.1 nothing listens on (the kernel picks it).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop() {
  [[ -d $dir ]] || return 0
  if [[ -f $dir/pids ]]; then
    while read -r pid name; do
      kill -TERM "$pid" 2>/dev/null || true
    done <"$dir/pids"
    # Swift's servers and memcached exit within a second of SIGTERM; what does not is killed.
    for _ in $(seq 50); do
      alive=0
      while read -r pid name; do kill -0 "$pid" 2>/dev/null && alive=1; done <"$dir/pids"
      ((alive)) || break
      sleep 0.1
    done
    while read -r pid name; do kill -KILL "$pid" 2>/dev/null || true; done <"$dir/pids"
  fi
  rm -rf "$dir"
}

server_config() {  # NAME PORT
  cat <<EOF
[DEFAULT]
devices = $dir/devices
mount_check = false
bind_ip = 127.0.0.1
bind_port = $2
workers = 1
user = swift
swift_dir = /etc/swift
log_name = $1-server

[pipeline:main]
pipeline = $1-server

[app:$1-server]
use = egg:swift#$1
EOF
}

start() {
  if [[ -f $dir/pids ]]; then
    echo "object-store: $dir already holds a running store (stop it first)" >&2
    exit 1
  fi
  for program in swift-proxy-server swift-object-server swift-container-server swift-account-server \
    swift-ring-builder memcached unshare curl; do
    command -v "$program" >/dev/null || {
      echo "object-store: $program is missing (scripts/setup.sh installs it)" >&2
      exit 1
    }
  done
  [[ $(id -u) -eq 0 ]] || {
    echo "object-store: must run as root (a mount namespace for /etc/swift; servers drop to user swift)" >&2
    exit 1
  }
  mkdir -p "$dir/etc" "$dir/devices/d1" "$dir/logs"
  chmod 755 "$dir"
  chown -R swift:swift "$dir/devices"
  # The servers run as user swift: every directory above DIR must let it through.
  if ! setpriv --reuid swift --regid swift --clear-groups test -w "$dir/devices/d1"; then
    echo "object-store: user swift cannot reach $dir/devices (a directory above $dir is not searchable by others);" \
      "choose a DIR under a directory such as /tmp" >&2
    rm -rf "$dir"
    exit 1
  fi

  local proxy_port=${DELTAVM_OBJECT_STORE_PORT:-$(free_port)}
  local object_port container_port account_port memcached_port
  object_port=$(free_port)
  container_port=$(free_port)
  account_port=$(free_port)
  memcached_port=$(free_port)
  local secret
  secret=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')

  cat >"$dir/etc/swift.conf" <<EOF
[swift-hash]
swift_hash_path_suffix = $(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
swift_hash_path_prefix = $(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')

[storage-policy:0]
name = Policy-0
default = yes
EOF
  server_config object "$object_port" >"$dir/etc/object-server.conf"
  server_config container "$container_port" >"$dir/etc/container-server.conf"
  server_config account "$account_port" >"$dir/etc/account-server.conf"
  cat >"$dir/etc/proxy-server.conf" <<EOF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $proxy_port
workers = 1
user = swift
swift_dir = /etc/swift
log_name = proxy-server

[pipeline:main]
pipeline = catch_errors proxy-logging cache s3api tempauth copy slo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:$memcached_port

[filter:s3api]
use = egg:swift#s3api
location = us-east-1

[filter:tempauth]
use = egg:swift#tempauth
user_deltavm_tester = $secret .admin

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo
EOF

  local ring port
  for ring in object container account; do
    case $ring in
      object) port=$object_port ;;
      container) port=$container_port ;;
      account) port=$account_port ;;
    esac
    swift-ring-builder "$dir/etc/$ring.builder" create 10 1 1 >/dev/null
    swift-ring-builder "$dir/etc/$ring.builder" add "r1z1-127.0.0.1:$port/d1" 1 >/dev/null
    swift-ring-builder "$dir/etc/$ring.builder" rebalance >/dev/null
  done
  chown -R swift:swift "$dir/etc"

  : >"$dir/pids"
  memcached -u memcache -l 127.0.0.1 -p "$memcached_port" -U 0 -m 16 >"$dir/logs/memcached.log" 2>&1 &
  echo "$! memcached" >>"$dir/pids"
  local server
  for server in account container object proxy; do
    # unshare(1) without --fork execs in place, and so does sh: the pid is the server's.
    unshare --mount --propagation private sh -c \
      'mount --bind "$1" /etc/swift && shift && exec "$@"' sh "$dir/etc" \
      "swift-$server-server" "$dir/etc/$server-server.conf" >"$dir/logs/$server.log" 2>&1 &
    echo "$! swift-$server-server" >>"$dir/pids"
  done

  cat >"$dir/env" <<EOF
export DELTAVM_S3_ENDPOINT=http://127.0.0.1:$proxy_port
export AWS_ACCESS_KEY_ID=deltavm:tester
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_DEFAULT_REGION=us-east-1
export DELTAVM_S3_BUCKET_HINT=deltavm-$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')
EOF
  chmod 600 "$dir/env"

  # The proxy answers some seconds after it starts: wait until an unsigned request gets an S3
  # answer (403), for at most a minute.
  local code=000
  for _ in $(seq 600); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$proxy_port/" || true)
    [[ $code != 000 ]] && break
    while read -r pid name; do
      kill -0 "$pid" 2>/dev/null || {
        echo "object-store: $name exited at start; its log:" >&2
        server=${name#swift-}
        tail -20 "$dir/logs/${server%-server}.log" >&2 || true
        stop
        exit 1
      }
    done <"$dir/pids"
    sleep 0.1
  done
  if [[ $code == 000 ]]; then
    echo "object-store: the proxy on 127.0.0.1:$proxy_port did not answer within a minute" >&2
    stop
    exit 1
  fi
  echo "object-store: Swift with s3api on http://127.0.0.1:$proxy_port (settings: $0 env $dir)" >&2
}

case $command in
  start) start ;;
  restart)
    stop
    start
    ;;
  stop) stop ;;
  env)
    [[ -f $dir/env ]] || {
      echo "object-store: no store runs in $dir (start one: $0 start $dir)" >&2
      exit 1
    }
    cat "$dir/env"
    ;;
  *) usage ;;
esac
