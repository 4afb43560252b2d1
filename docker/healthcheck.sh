#!/usr/bin/env bash
# The container health check of callback-service: `GET /` on the API port must answer 200,
# which it does only while the database answers.
#
# Plain bash (/dev/tcp), so the runtime image needs no curl or wget. The port comes from
# CALLBACK_HTTP__LISTEN when it is set, as it does for the service. Exit 0 healthy, 1 not.
set -euo pipefail

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
printf 'GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$host" >&3
status=""
IFS= read -r -t 2 status <&3 || true
exec 3<&-
status="${status%$'\r'}"
case "$status" in
  "HTTP/1.1 200 "*) exit 0 ;;
  *)
    echo "unhealthy: GET / on $host:$port answered ${status:-nothing}"
    exit 1
    ;;
esac
