#!/usr/bin/env bash
# What the Docker image runs, without a Docker engine: a static `bus` in a root directory
# holding only what the image gives it (the binary, the CA bundle, an empty /data owned by
# the image's user 65532; /proc, which the container runtime mounts), run as that user
# with the Dockerfile's ENV, in a network namespace of its own (its port 2021 is nobody
# else's). The server must become healthy by `bus health` run the way the HEALTHCHECK runs
# it, take an event with `bus put` and give it back with `bus get` (both run in the same
# root, as `docker exec` would), and exit 0 on SIGTERM. Then again with BUS_ADDR on
# another port, as docker-compose.yml's environment may set it: the health check must
# follow it, and fail for the old port.
#
#   deploy/check-image-root.sh target/x86_64-unknown-linux-musl/debug/bus
#
# Needs root (chroot, namespaces, files owned by 65532), util-linux's unshare and ip.
set -euo pipefail
cd "$(dirname "$0")/.."

bus=${1:?usage: deploy/check-image-root.sh PATH_TO_STATIC_BUS}
if [ "$(id -u)" -ne 0 ]; then
  # A user namespace maps only our own uid: 65532 would not exist in it.
  echo "skipped the image check: it runs as root (it chroots and runs as uid 65532)"
  exit 0
fi

# Static: no program interpreter (the dynamic loader, absent from the image) and no
# shared library needed.
if readelf --program-headers "$bus" | grep -q INTERP \
  || readelf --dynamic "$bus" | grep -q NEEDED; then
  echo "$bus is not statically linked:" >&2
  exit 1
fi
if command -v file >/dev/null; then file "$bus"; fi

# The image's settings, from the Dockerfile: its user and its ENV block (KEY=VALUE words,
# one instruction continued over lines), plus the PATH distroless sets.
grep -qx 'USER 65532:65532' Dockerfile || { echo "the Dockerfile no longer runs as 65532" >&2; exit 1; }
mapfile -t image_env < <(awk '
  /^ENV / { on = 1; sub(/^ENV /, "") }
  on { line = $0; more = sub(/\\$/, "", line); n = split(line, words, " ")
       for (i = 1; i <= n; i++) print words[i]
       if (!more) on = 0 }' Dockerfile)
image_env+=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" "HOME=/home/nonroot")
printf 'image ENV: %s\n' "${image_env[*]}"

root=$(mktemp -d)
ns=""
cleanup() {
  # The namespace's first process is the script below: when it dies, every process in
  # the namespace (the server included) dies with it.
  if [ -n "$ns" ]; then kill -KILL "$ns" 2>/dev/null || true; wait "$ns" 2>/dev/null || true; fi
  rm -rf "$root"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
chmod 755 "$root"
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/data" "$root/proc"
cp "$bus" "$root/usr/local/bin/bus"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
chown 65532:65532 "$root/data"

# Runs inside new mount, PID and network namespaces, as their process 1.
inside() {
  set -euo pipefail
  local root=$1
  shift
  local image_env=("$@")
  ip link set lo up
  mount -t proc proc "$root/proc"
  # The command line (in `argv`) that runs a command in the image's root, as its user,
  # with its ENV and the overrides given before `--` (docker run's `--env KEY=VALUE`).
  # env and unshare exec what they run: the process started is the command's.
  image_argv() {
    local overrides=()
    while [ "${1:-}" != "--" ]; do overrides+=("$1"); shift; done
    shift
    argv=(env -i "${image_env[@]}" "${overrides[@]}"
      unshare --root="$root" --wd=/data --setuid=65532 --setgid=65532 "$@")
  }
  image() {
    local argv
    image_argv "$@"
    "${argv[@]}"
  }
  run_server() {
    local port=$1
    shift
    echo "== bus server on port $port${*:+, with $*}"
    local argv
    image_argv "$@" -- bus server
    "${argv[@]}" &
    local server=$!
    local healthy=""
    for _ in $(seq 1 100); do
      if ! kill -0 "$server" 2>/dev/null; then
        wait "$server" || true
        echo "the server exited before it was healthy" >&2
        return 1
      fi
      if image "$@" -- bus health 2>/dev/null; then healthy=1; break; fi
      sleep 0.2
    done
    [ -n "$healthy" ] || { image "$@" -- bus health || true; echo "not healthy within 20 s" >&2; return 1; }
    echo "healthy (bus health, exit 0)"
    # As the image's user: what the server writes in /data is that user's.
    if ! grep -Eq '^Uid:\s+65532\s' "$root/proc/$server/status"; then
      echo "the server does not run as uid 65532:" >&2
      grep '^Uid:' "$root/proc/$server/status" >&2
      return 1
    fi
    # The check follows BUS_ADDR: asked for another port, it fails.
    if [ "$port" != 2021 ] && image "$@" BUS_ADDR=0.0.0.0:2021 -- bus health 2>/dev/null; then
      echo "bus health succeeded on port 2021, where no server listens" >&2
      return 1
    fi
    local payload="{\"check\":\"image-$port\"}"
    image "$@" -- bus put app.image.check "$payload" >/dev/null
    local got
    got=$(image "$@" -- bus get --subject 'app.image.>' --start oldest --until-now)
    if ! grep -qF "\"payload\":$payload" <<<"$got"; then
      printf 'bus get did not return the event published; it printed:\n%s\n' "$got" >&2
      return 1
    fi
    echo "put and get: $got"
    kill -TERM "$server"
    local status=0
    wait "$server" || status=$?
    if [ "$status" -ne 0 ]; then
      echo "the server exited with status $status on SIGTERM" >&2
      return 1
    fi
    echo "stopped by SIGTERM, exit 0"
  }
  # The Dockerfile's settings as they are, then BUS_ADDR (and BUS_HOST, for the client
  # tools) moved to another port, as compose's environment may move them.
  run_server 2021
  run_server 2022 BUS_ADDR=0.0.0.0:2022 BUS_HOST=http://127.0.0.1:2022
}

unshare --mount --pid --net --fork --kill-child \
  bash -c "$(declare -f inside); inside \"\$@\"" inside "$root" "${image_env[@]}" &
ns=$!
status=0
wait "$ns" || status=$?
ns=""
if [ "$status" -ne 0 ]; then
  echo "the image check failed (status $status)" >&2
  exit 1
fi
echo "the image's root runs bus: healthy, put and get, SIGTERM exits 0"
