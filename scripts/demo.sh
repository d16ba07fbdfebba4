#!/usr/bin/env bash
# tokend's main job, on this machine, in under a minute, with no PandaDoc
# account: starts the fake provider (tokens that live 10 s), writes a config in
# a temporary directory, imports a credential, runs the daemon and shows the
# token file following every rotation.
#
# Usage: scripts/demo.sh            (runs 30 s; DEMO_SECONDS=N to change, 0 = until Ctrl-C)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${DEMO_SECONDS:-30}

echo "==> building tokend and the fake provider"
cargo build --quiet --workspace --bins
bin=target/debug

demo=$(mktemp -d /tmp/tokend-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "==> demo files kept in $demo (logs: $demo/*.log)"
}
trap cleanup EXIT

echo "==> starting the fake provider"
"$bin/tokend-fake-provider" --listen 127.0.0.1:0 --token-lifetime 10 \
  --write-client-secret "$demo/client.secret" --grant-file "$demo/refresh.token" \
  > "$demo/provider.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q '^listening on ' "$demo/provider.log" && break; sleep 0.1; done
url=$(sed -n 's/^listening on //p' "$demo/provider.log")
echo "    $url"

cat > "$demo/config.toml" <<CONF
database = "$demo/state/tokend.db"
socket   = "$demo/tokend.sock"

[refresh]
validate_schedule     = "*/5 * * * * *"   # validate every 5 s, for the demo
refresh_before_expiry = "4s"
min_remaining         = "2s"
retry_initial         = "1s"
retry_max             = "10s"

[providers.demo]
client_id          = "tokend-test-client"
client_secret_file = "$demo/client.secret"
authorize_url      = "$url/oauth2/authorize"
token_url          = "$url/oauth2/access_token"
validate_url       = "$url/public/v1/members/current"

[[sinks]]
path   = "$demo/tokens/{name}.json"
format = "json"
mode   = "0640"
CONF

tokend() { "$bin/tokend" -c "$demo/config.toml" "$@"; }
echo "==> tokend check-config"
tokend check-config
echo "==> tokend import sales-bot --provider demo --refresh-token -   (the token comes on stdin, never argv)"
tokend import sales-bot --provider demo --refresh-token - < "$demo/refresh.token"

echo "==> tokend run   (log: $demo/tokend.log)"
"$bin/tokend" -c "$demo/config.toml" run 2> "$demo/tokend.log" &
pids+=($!)

file="$demo/tokens/sales-bot.json"
last=""
start=$SECONDS
while [ "$seconds" = 0 ] || [ $((SECONDS - start)) -lt "$seconds" ]; do
  if [ -f "$file" ]; then
    now=$(cat "$file")
    if [ "$now" != "$last" ]; then
      # Show the token's shape, not the token: the demo practises what it preaches.
      printf '%s  %s  %s\n' "$(date +%T)" "$(stat -c '%A' "$file")" \
        "$(sed -E 's/"access_token":"(.{8})[^"]*"/"access_token":"\1…"/' "$file")"
      last=$now
    fi
  fi
  sleep 0.2
done
echo "==> tokend list"
tokend list
echo "==> tokend status sales-bot   (asks the daemon over its socket)"
tokend status sales-bot
echo "==> tokend token sales-bot     (what a script would use; first 8 characters shown)"
tokend token sales-bot | cut -c1-8
