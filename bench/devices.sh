#!/usr/bin/env bash
# Wall time of multi-device operations as a user waits for them, with the release
# binaries in DIR, on a node of its own (127.0.0.1:$PORT, rate limits off):
#  - linking a device to a user who is in $GROUPS groups ($GROUP_COUNT, default 10), each shared with
#    one other person: `devices add CODE` on the existing device (one Commit per group)
#    and the new device's first `recv` (completes the link, joins every group);
#  - inviting a user with 3 devices (one Commit, three KeyPackages), against inviting a
#    user with one device, into fresh two-member groups.
# Milliseconds, $RUNS runs each (default 3).
# Usage: bench/devices.sh target/release
BIN=$1; GROUPS_N=${GROUP_COUNT:-10}; RUNS=${RUNS:-3}; PORT=${PORT:-47231}
DIR=$(mktemp -d /tmp/devbench.XXXXXX)
"$BIN/quicnprotochat-server" --listen 127.0.0.1:$PORT --db "$DIR/node.db" --tls-cert "$DIR/cert.der" --tls-key "$DIR/key.der" \
  --enqueue-rate 0 --key-package-fetch-rate 0 --ping-rate 0 2>"$DIR/node.log" &
NODE=$!
trap 'kill $NODE 2>/dev/null; rm -rf "$DIR"' EXIT
sleep 1
# State files are encrypted; every one here has this passphrase.
export QUICNPROTOCHAT_STATE_PASSPHRASE=bench
C() { "$BIN/quicnprotochat-client" --server 127.0.0.1:$PORT --ca-cert "$DIR/cert.der" "$@"; }
ok() { "$@" >/dev/null 2>"$DIR/err" || { echo "FAILED: $*" >&2; cat "$DIR/err" >&2; exit 1; }; }
t() { local s=$(date +%s%N); "$@" >/dev/null 2>"$DIR/t.err" || { echo "FAILED: $*" >&2; cat "$DIR/t.err" >&2; exit 1; }; echo -n " $(( ($(date +%s%N) - s) / 1000000 ))"; }

echo -n "link a device in $GROUPS_N groups, devices add ms / new device's recv ms:"
for r in $(seq 1 "$RUNS"); do
  U=$(C register-state --state "$DIR/u$r.state" 2>/dev/null)
  ok C register-state --state "$DIR/p$r.state"
  for g in $(seq 1 "$GROUPS_N"); do
    ok C create-group --state "$DIR/p$r.state" --group-id "g$g"
    ok C invite --state "$DIR/p$r.state" --group-id "g$g" --peer-key "$U"
  done
  ok C recv --state "$DIR/u$r.state"
  CODE=$(C link --state "$DIR/l$r.state" 2>/dev/null)
  echo -n " ["; t C devices add --state "$DIR/u$r.state" "$CODE"; echo -n " /"; t C recv --state "$DIR/l$r.state"; echo -n " ]"
  joined=$(C groups --state "$DIR/l$r.state" 2>/dev/null | wc -l)
  [ "$joined" = "$GROUPS_N" ] || { echo "the new device is in $joined groups, not $GROUPS_N" >&2; exit 1; }
done
echo

# A user with three devices: the first and two linked ones.
T=$(C register-state --state "$DIR/t0.state" 2>/dev/null)
for d in 1 2; do
  CODE=$(C link --state "$DIR/t$d.state" 2>/dev/null)
  ok C devices add --state "$DIR/t0.state" "$CODE"
  ok C recv --state "$DIR/t$d.state"
done
echo -n "invite a user with 3 devices ms:"
for r in $(seq 1 "$RUNS"); do
  ok C register-state --state "$DIR/i$r.state"
  ok C create-group --state "$DIR/i$r.state" --group-id three
  t C invite --state "$DIR/i$r.state" --group-id three --peer-key "$T"
  for d in 0 1 2; do ok C register-state --state "$DIR/t$d.state"; done   # top up KeyPackages
done
echo
echo -n "invite a user with 1 device ms:"
for r in $(seq 1 "$RUNS"); do
  S=$(C register-state --state "$DIR/s$r.state" 2>/dev/null)
  ok C register-state --state "$DIR/j$r.state"
  ok C create-group --state "$DIR/j$r.state" --group-id one
  t C invite --state "$DIR/j$r.state" --group-id one --peer-key "$S"
done
echo
