#!/usr/bin/env bash
# Wall time of the CLI's group changes, as a user waits for them: builds a group of
# $MEMBERS (default 100) with the release binaries in DIR (quicnprotochat-server and
# quicnprotochat-client), then times `update` five times and `invite` of one more member
# three times, and `send` of a short message five times, in milliseconds. Starts its own
# node on 127.0.0.1:$PORT (rate limits off). SUITE picks the group's ciphersuite
# (x25519, the default, or mlkem768x25519).
# Usage: [SUITE=mlkem768x25519] bench/cli_group_changes.sh target/release
BIN=$1; MEMBERS=${MEMBERS:-100}; PORT=${PORT:-47211}; SUITE=${SUITE:-x25519}
DIR=$(mktemp -d /tmp/clibench.XXXXXX)
"$BIN/quicnprotochat-server" --listen 127.0.0.1:$PORT --db "$DIR/node.db" --tls-cert "$DIR/cert.der" --tls-key "$DIR/key.der" \
  --enqueue-rate 0 --key-package-fetch-rate 0 --ping-rate 0 2>"$DIR/node.log" &
NODE=$!
trap 'kill $NODE 2>/dev/null; rm -rf "$DIR"' EXIT
sleep 1
# State files are encrypted; every one here has this passphrase.
export QUICNPROTOCHAT_STATE_PASSPHRASE=bench
C() { "$BIN/quicnprotochat-client" --server 127.0.0.1:$PORT --ca-cert "$DIR/cert.der" "$@"; }
pids=()
for i in $(seq 0 $((MEMBERS + 3))); do
  C register-state --state "$DIR/m$i.state" > "$DIR/k$i" 2>/dev/null & pids+=($!)
  if (( ${#pids[@]} == 8 )); then wait "${pids[@]}"; pids=(); fi
done
if (( ${#pids[@]} )); then wait "${pids[@]}"; fi; pids=()
C create-group --state "$DIR/m0.state" --group-id g --ciphersuite "$SUITE" >/dev/null 2>&1 || echo "create failed"
ARGS=(); for i in $(seq 1 $((MEMBERS - 1))); do ARGS+=(--peer-key "$(cat "$DIR/k$i")"); done
C invite --state "$DIR/m0.state" --group-id g "${ARGS[@]}" >/dev/null 2>"$DIR/inv.err" || { echo "invite failed"; cat "$DIR/inv.err"; exit 1; }
for i in $(seq 1 $((MEMBERS - 1))); do
  C recv --state "$DIR/m$i.state" >/dev/null 2>&1 & pids+=($!)
  if (( ${#pids[@]} == 8 )); then wait "${pids[@]}"; pids=(); fi
done
if (( ${#pids[@]} )); then wait "${pids[@]}"; fi
t() { local s=$(date +%s%N); "$@" >/dev/null 2>"$DIR/t.err" || { echo "FAILED: $*" >&2; cat "$DIR/t.err" >&2; }; echo "$(( ($(date +%s%N) - s) / 1000000 ))"; }
echo -n "update ms:"; for r in 1 2 3 4 5; do echo -n " $(t C update --state "$DIR/m0.state" --group-id g)"; done; echo
echo -n "invite one ms:"; for j in 1 2 3; do k=$(cat "$DIR/k$((MEMBERS - 1 + j))"); echo -n " $(t C invite --state "$DIR/m0.state" --group-id g --peer-key "$k")"; done; echo
echo -n "send ms:"; for r in 1 2 3 4 5; do echo -n " $(t C send --state "$DIR/m0.state" --group-id g --msg "hello $r")"; done; echo
echo "members: $(C members --state "$DIR/m0.state" --group-id g 2>/dev/null | wc -l)"
