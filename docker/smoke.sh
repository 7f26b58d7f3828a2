#!/usr/bin/env bash
# The Compose path, run for real: `bash docker/smoke.sh` (as root, on a Debian machine).
#
# 1. Makes sure a Docker engine runs (installs Debian's docker.io, docker-compose, debootstrap
#    and jq if missing, and starts dockerd).
# 2. Makes the base images docker/Dockerfile names, locally, when the engine does not have them
#    (for machines that cannot pull from Docker Hub): `debian:bookworm-slim` from debootstrap,
#    `rust:<version>-bookworm` from it plus the Rust toolchain of this machine
#    (docker/local-base/rust.Dockerfile).
# 3. Builds every image with the real Dockerfile and Compose file, plus the embedded broker's
#    image that docker/compose.embedded-broker.yml puts in place of Apache Kafka (which cannot
#    be had here: that override replaces the `kafka` and `kafka-init` services, nothing else).
# 4. Brings the stack up and does what a user does, through the published ports: puts the
#    shop's products into the catalog, posts activity and an order, asks for a recommendation, opens the UI, finds the event's
#    correlation id in `docker-compose logs event-processor`, restarts analytics and checks
#    that its counts are unchanged, scales analytics to two replicas (`--scale`), kills the
#    working one with SIGKILL and checks that the other took over with every event counted
#    once.
# 5. Prints each image's size and the idle stack's memory, then stops the stack.
#
# Exits non-zero, naming what failed, on any failure. Environment:
#   SMOKE_KEEP=1             leave the stack running at the end
#   SMOKE_KAFKA=apache       use the Compose file alone (Apache Kafka from Docker Hub)
#   SMOKE_COMPOSE="docker compose"   the Compose command (default: docker-compose if present)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# With pipefail, a reader that stops early (`head`, `grep -q`) can fail its pipeline: the writer
# dies of SIGPIPE (141) if it writes after the reader left. Readers here read to the end.

step() { printf '\n== %s\n' "$*"; }
fail() {
  printf '\nSMOKE FAILED: %s\n' "$*" >&2
  exit 1
}

# --- 1. the engine --------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v jq >/dev/null || need+=(jq)
command -v curl >/dev/null || need+=(curl)
command -v bc >/dev/null || need+=(bc)
if ((${#need[@]})); then
  step "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's client matches Debian's engine (a newer client on the PATH may insist on buildx).
DOCKER=docker
[[ -x /usr/bin/docker ]] && DOCKER=/usr/bin/docker
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
if ! $DOCKER info >/dev/null 2>&1; then
  step "starting dockerd"
  setsid -f dockerd --storage-driver=overlay2 >/var/log/dockerd-smoke.log 2>&1
  for _ in $(seq 60); do $DOCKER info >/dev/null 2>&1 && break; sleep 1; done
  $DOCKER info >/dev/null 2>&1 || fail "dockerd did not start (see /var/log/dockerd-smoke.log)"
fi
if [[ -n "${SMOKE_COMPOSE:-}" ]]; then
  read -r -a COMPOSE <<<"$SMOKE_COMPOSE"
elif command -v docker-compose >/dev/null; then
  COMPOSE=(docker-compose)
else
  COMPOSE=(docker compose)
fi
FILES=(-f docker-compose.yml)
[[ "${SMOKE_KAFKA:-embedded}" == apache ]] || FILES+=(-f docker/compose.embedded-broker.yml)
compose() { "${COMPOSE[@]}" -p retargetiq-smoke "${FILES[@]}" "$@"; }

# --- 2. base images -------------------------------------------------------------------------
arg_default() { sed -n "s/^ARG $1=//p" docker/Dockerfile | head -n1; }
RUST_VERSION=$(arg_default RUST_VERSION)
DEBIAN=$(arg_default DEBIAN)
work=$(mktemp -d)
cleanup() {
  rm -rf "$work"
  if [[ "${SMOKE_KEEP:-0}" != 1 ]]; then
    compose down -v --remove-orphans >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

if ! $DOCKER image inspect "debian:$DEBIAN-slim" >/dev/null 2>&1; then
  step "making debian:$DEBIAN-slim with debootstrap"
  mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1)
  [[ -n "$mirror" ]] || mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  mirror=${mirror:-http://deb.debian.org/debian}
  debootstrap --variant=minbase "$DEBIAN" "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log"; fail "debootstrap $DEBIAN from $mirror"; }
  # What Docker Hub's -slim images leave out (downloaded packages, package lists, docs) and
  # how they keep later `apt-get install`s small: no package caches, no docs.
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/cache/apt/*.bin \
    "$work"/rootfs/var/lib/apt/lists/* "$work"/rootfs/usr/share/doc/* "$work"/rootfs/usr/share/man/* \
    "$work"/rootfs/usr/share/locale/*
  cat >"$work/rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
    >"$work/rootfs/etc/dpkg/dpkg.cfg.d/docker"
  tar -C "$work/rootfs" -c . | $DOCKER import - "debian:$DEBIAN-slim" >/dev/null
  rm -rf "$work/rootfs"
fi

if ! $DOCKER image inspect "rust:$RUST_VERSION-$DEBIAN" >/dev/null 2>&1; then
  step "making rust:$RUST_VERSION-$DEBIAN from this machine's toolchain"
  command -v rustc >/dev/null || fail "no Rust toolchain on this machine to copy into rust:$RUST_VERSION-$DEBIAN"
  have=$(rustc --version | awk '{print $2}')
  [[ "$have" == "$RUST_VERSION" || "$have" == "$RUST_VERSION".* ]] \
    || fail "docker/Dockerfile wants Rust $RUST_VERSION, this machine has $have"
  sysroot=$(rustc --print sysroot)
  mkdir -p "$work/rust/toolchain" "$work/rust/certs"
  # The toolchain without its documentation (share/).
  for d in bin lib libexec etc; do
    [[ -e "$sysroot/$d" ]] && cp -a "$sysroot/$d" "$work/rust/toolchain/"
  done
  cp /usr/local/share/ca-certificates/*.crt "$work/rust/certs/" 2>/dev/null || true
  $DOCKER build -q -t "rust:$RUST_VERSION-$DEBIAN" --build-arg "DEBIAN=$DEBIAN" \
    -f docker/local-base/rust.Dockerfile "$work/rust" >/dev/null || fail "building rust:$RUST_VERSION-$DEBIAN"
  rm -rf "$work/rust"
fi

# --- 3. build -------------------------------------------------------------------------------
step "building the images (${COMPOSE[*]} build)"
started=$(date +%s)
# One service at a time: the first builds the workspace, the others reuse its layers.
compose build || fail "building the images"
echo "built in $(($(date +%s) - started)) s"

# --- 4. up, and what a user does ------------------------------------------------------------
step "starting the stack"
compose down -v --remove-orphans >/dev/null 2>&1 || true
# The shop whose pages may call the services from the browser (checked below).
export CORS_ALLOWED_ORIGINS=https://shop.example
compose up -d || fail "starting the stack"

SERVICES=(user-activity order event-processor analytics feature-store retrieval ranking rl-offer recommendation-api frontend-ui)
deadline=$(($(date +%s) + 300))
for s in "${SERVICES[@]}"; do
  while :; do
    id=$(compose ps -q "$s")
    status=$($DOCKER inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id" 2>/dev/null || echo missing)
    [[ "$status" == healthy ]] && break
    if (($(date +%s) > deadline)); then
      compose ps
      compose logs --tail 40 "$s"
      fail "$s is $status after 300 s"
    fi
    sleep 2
  done
done
echo "all ten services are healthy"
compose ps

http() { # METHOD URL [BODY] -> prints the body; fails unless 2xx
  local method=$1 url=$2 body=${3:-} out code
  out=$(mktemp)
  code=$(curl -sS -o "$out" -w '%{http_code}' -X "$method" -H 'content-type: application/json' \
    ${body:+--data "$body"} "$url") || { rm -f "$out"; fail "$method $url: no answer"; }
  if [[ "$code" != 2* ]]; then
    cat "$out" >&2
    rm -f "$out"
    fail "$method $url answered $code"
  fi
  cat "$out"
  rm -f "$out"
}

user="smoke-$(date +%s)"
step "putting the shop's products into the catalog"
http PUT localhost:8081/api/catalog/products '[
  {"productId":"SMOKE-SHOE-1","name":"Trail shoe","category":"shoes","price":89.0,"brand":"Acme"},
  {"productId":"SMOKE-SHOE-2","name":"Road shoe","category":"shoes","price":79.5},
  {"productId":"SMOKE-SOCK-1","name":"Wool socks","category":"shoes","price":12.0}]'
echo

step "posting activity and an order for $user"
answer=$(http POST localhost:8081/api/users/activity "[
  {\"eventId\":\"1\",\"userId\":\"$user\",\"eventType\":\"product_view\",\"productId\":\"SMOKE-SHOE-1\"},
  {\"eventId\":\"2\",\"userId\":\"$user\",\"eventType\":\"product_view\",\"productId\":\"SMOKE-SHOE-2\"},
  {\"eventId\":\"3\",\"userId\":\"$user\",\"eventType\":\"add_to_cart\",\"productId\":\"SMOKE-SHOE-2\"}]")
echo "$answer"
correlation=$(jq -r .correlationId <<<"$answer")
[[ "$(jq -r .accepted <<<"$answer")" == 3 ]] || fail "activity: expected 3 accepted, got $answer"
http POST localhost:8082/api/orders/place "{\"orderId\":\"o-1\",\"userId\":\"$user\",\"currency\":\"EUR\",
  \"items\":[{\"productId\":\"SMOKE-SOCK-1\",\"quantity\":2,\"unitPrice\":12.0}],\"amount\":24.0}"
echo

step "waiting for analytics to count them"
# The counts of $user on the analytics at host port ${1:-8084}.
counted() { http GET "localhost:${1:-8084}/api/analytics/user/$user" 2>/dev/null | jq -c '{counts, orders, revenue}'; }
deadline=$(($(date +%s) + 60))
until [[ "$(counted | jq '.orders')" == 1 ]] && [[ "$(counted | jq '[.counts[]] | add')" -ge 3 ]]; do
  (($(date +%s) > deadline)) && fail "analytics did not count the events within 60 s: $(counted || true)"
  sleep 1
done
before=$(counted)
echo "$before"

step "asking for a recommendation"
deadline=$(($(date +%s) + 60))
until reco=$(http GET "localhost:8089/recommend/$user?k=5") && [[ "$(jq .coldStart <<<"$reco")" == false ]]; do
  (($(date +%s) > deadline)) && fail "no personal recommendation for $user within 60 s: $reco"
  sleep 1
done
jq -c '{items: [.recommendations[].itemId], coldStart, requestId}' <<<"$reco"
jq -e '[.recommendations[].itemId] | index("SMOKE-SHOE-1")' <<<"$reco" >/dev/null \
  || fail "the viewed, unbought SMOKE-SHOE-1 is not recommended: $reco"

step "a shop's page may call the APIs from the browser (CORS_ALLOWED_ORIGINS), another may not"
# What a browser asks before a page's JSON POST, and what it reads on the answer to a GET.
allowed_origin() { # ORIGIN URL [METHOD] -> the Access-Control-Allow-Origin answered, if any
  curl -sS -o /dev/null -D - -X "${3:-GET}" -H "Origin: $1" -H 'Access-Control-Request-Method: POST' \
    -H 'Access-Control-Request-Headers: content-type' "$2" | tr -d '\r' \
    | sed -n 's/^access-control-allow-origin: //Ip'
}
[[ "$(allowed_origin https://shop.example localhost:8081/api/users/activity OPTIONS)" == https://shop.example ]] \
  || fail "user-activity did not allow the shop's preflight"
[[ "$(allowed_origin https://shop.example "localhost:8089/recommend/$user?k=5")" == https://shop.example ]] \
  || fail "recommendation-api did not let the shop's page read its answer"
[[ -z "$(allowed_origin https://elsewhere.example "localhost:8089/recommend/$user?k=5")" ]] \
  || fail "recommendation-api let another origin read its answer"
echo "https://shop.example may call user-activity and recommendation-api; https://elsewhere.example may not"

step "changing a price: the recommendation shows it"
http PUT localhost:8081/api/catalog/products \
  '[{"productId":"SMOKE-SHOE-1","name":"Trail shoe","category":"shoes","price":99.0,"brand":"Acme"}]'
echo
deadline=$(($(date +%s) + 30))
until [[ "$(http GET "localhost:8089/recommend/$user?k=5" | jq '.recommendations[] | select(.itemId == "SMOKE-SHOE-1") | .price == 99')" == true ]]; do
  (($(date +%s) > deadline)) && fail "the new price of SMOKE-SHOE-1 did not reach the recommendation within 30 s"
  sleep 1
done
echo "the recommendation shows the new price"

step "opening the UI"
page=$(http GET localhost:3000/)
grep -qi '<html' <<<"$page" || fail "the UI did not answer with a page"
user_page=$(http GET "localhost:3000/users/$user")
grep -q "$user" <<<"$user_page" || fail "the UI's user page does not name $user"
echo "the dashboard and the user page render"

step "reading the event processor's logs"
processor_logs=$(compose logs --no-color event-processor)
grep -F "$correlation" <<<"$processor_logs" | sed -n 1,3p \
  || fail "correlation id $correlation not in 'logs event-processor'"

step "restarting analytics"
compose restart analytics
deadline=$(($(date +%s) + 120))
until [[ "$($DOCKER inspect -f '{{.State.Health.Status}}' "$(compose ps -q analytics)")" == healthy ]]; do
  (($(date +%s) > deadline)) && fail "analytics not healthy 120 s after its restart"
  sleep 2
done
after=$(counted)
echo "$after"
[[ "$after" == "$before" ]] || fail "analytics' counts changed across its restart: before $before, after $after"
echo "counts unchanged"

step "scaling analytics out: the second replica waits as a standby"
# With the embedded broker the replicas share the partitions statically: the second waits on
# the lock in the shared volume (on Apache Kafka they would split the partitions instead).
export ANALYTICS_PORT=18084-18093
compose up -d --scale analytics=2 analytics || fail "scaling analytics to two replicas"
health() { $DOCKER inspect -f '{{.State.Health.Status}}' "$1" 2>/dev/null || echo missing; }
replicas() { compose ps -q analytics; }
host_port() { $DOCKER port "$1" 8084/tcp | sed -n '1s/.*://p'; }
deadline=$(($(date +%s) + 180))
while :; do
  mapfile -t ids < <(replicas)
  working=() standby=()
  for id in "${ids[@]}"; do
    if [[ "$(health "$id")" == healthy ]]; then working+=("$id"); else standby+=("$id"); fi
  done
  if ((${#ids[@]} == 2 && ${#working[@]} == 1)) \
    && $DOCKER logs "${standby[0]}" 2>&1 | grep -c "waiting as a standby" >/dev/null; then
    break
  fi
  (($(date +%s) > deadline)) && { compose ps; fail "expected one working analytics and one standby, got ${#working[@]} of ${#ids[@]} healthy"; }
  sleep 2
done
port=$(host_port "${working[0]}")
echo "working replica on host port $port; the other waits as a standby"
[[ "$(counted "$port")" == "$before" ]] || fail "the scaled-out analytics counts $(counted "$port"), not $before"
views() { # N FIRST-ID: N more product views of $user
  local events=() i
  for ((i = $2; i < $2 + $1; i++)); do
    events+=("{\"eventId\":\"scale-$i\",\"userId\":\"$user\",\"eventType\":\"product_view\",\"productId\":\"SMOKE-SOCK-1\"}")
  done
  http POST localhost:8081/api/users/activity "[$(IFS=,; echo "${events[*]}")]" >/dev/null
}
total() { counted "$1" | jq '[.counts[]] | add'; }
base=$(total "$port")
views 3 1
deadline=$(($(date +%s) + 60))
until [[ "$(total "$port")" == $((base + 3)) ]]; do
  (($(date +%s) > deadline)) && fail "the working replica did not count 3 more views: $(total "$port")"
  sleep 1
done

step "killing the working analytics with SIGKILL: the standby takes over"
$DOCKER kill -s KILL "${working[0]}" >/dev/null
views 2 4 # sent while no replica consumes
deadline=$(($(date +%s) + 180))
until [[ "$(health "${standby[0]}")" == healthy ]]; do
  (($(date +%s) > deadline)) && { $DOCKER logs --tail 20 "${standby[0]}"; fail "the standby did not take over within 180 s"; }
  sleep 2
done
port=$(host_port "${standby[0]}")
deadline=$(($(date +%s) + 60))
until [[ "$(total "$port")" == $((base + 5)) ]]; do
  (($(date +%s) > deadline)) && fail "after the takeover $user has $(total "$port") events counted, expected $((base + 5))"
  sleep 1
done
sleep 5
[[ "$(total "$port")" == $((base + 5)) ]] || fail "counted twice after the takeover: $(total "$port"), expected $((base + 5))"
echo "the former standby (host port $port) counts every event once: $(counted "$port")"
unset ANALYTICS_PORT
compose up -d --scale analytics=1 analytics >/dev/null 2>&1 || fail "scaling analytics back to one"

# --- 5. figures -----------------------------------------------------------------------------
step "image sizes"
for s in "${SERVICES[@]}"; do
  $DOCKER image inspect -f "{{.Size}}" "retargetiq/$s:latest" | awk -v s="$s" '{printf "%-20s %6.1f MB\n", s, $1 / 1e6}'
done
step "idle stack (after 30 s without traffic): resident memory of each container's process, CPU"
sleep 30
total=0
for id in $(compose ps -q); do
  pid=$($DOCKER inspect -f '{{.State.Pid}}' "$id")
  name=$($DOCKER inspect -f '{{.Name}}' "$id")
  [[ "$pid" == 0 ]] && continue
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  total=$((total + rss))
  printf '%-45s %7.1f MiB\n' "${name#/}" "$(echo "$rss / 1024" | bc -l)"
done
printf '%-45s %7.1f MiB\n' total "$(echo "$total / 1024" | bc -l)"
# shellcheck disable=SC2046
$DOCKER stats --no-stream --format '{{.Name}}\t{{.CPUPerc}}' $(compose ps -q) | sort

step "the Compose path works"
if [[ "${SMOKE_KEEP:-0}" == 1 ]]; then
  echo "the stack is still running (project retargetiq-smoke): ${COMPOSE[*]} -p retargetiq-smoke ${FILES[*]} down -v"
fi
