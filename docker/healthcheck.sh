#!/usr/bin/env bash
# The container health check of callback-service: `GET <path>` on the API port must answer
# 200. The path is the first argument, `/livez` when none is given:
#   /livez   200 while the process serves requests; it never touches the database, so a
#            database blip does not make the container unhealthy (and restarted for nothing).
#   /readyz  200 only while callbacks can be accepted: the database answers, the service is
#            not shutting down and the backlog is below its bound (compose waits on it).
#
# Plain bash (/dev/tcp), so the runtime image needs no curl or wget. The port comes from
# CALLBACK_HTTP__LISTEN when it is set, as it does for the service. Exit 0 healthy, 1 not.
set -euo pipefail

path="${1:-/livez}"
case "$path" in
  /*) ;;
  *)
    echo "unhealthy: the path to check must start with /, not: $path"
    exit 1
    ;;
esac

listen="${CALLBACK_HTTP__LISTEN:-0.0.0.0:9090}"
port="${listen##*:}"
host="${listen%:*}"
host="${host#[}"
host="${host%]}"
case "$host" in
  "" | 0.0.0.0 | "::") host=127.0.0.1 ;;
esac

if ! exec 3<>"/dev/tcp/$host/$port"; then
  echo "unhealthy: nothing listens on $host:$port"
  exit 1
fi
printf 'GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$host" >&3
status=""
IFS= read -r -t 2 status <&3 || true
exec 3<&-
status="${status%$'\r'}"
case "$status" in
  "HTTP/1.1 200 "*) exit 0 ;;
  *)
    echo "unhealthy: GET $path on $host:$port answered ${status:-nothing}"
    exit 1
    ;;
esac
