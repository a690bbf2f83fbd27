#!/usr/bin/env bash
# A throwaway PostgreSQL for the benchmarks, and what the database spends per
# delivered message.
#
# Usage:
#   bench/postgres.sh start DIR PORT   initdb in DIR (as the postgres user when
#                                      run as root), start it on PORT with
#                                      pg_stat_statements, create database
#                                      `bench`; prints its URL
#   bench/postgres.sh stop DIR         stop it and delete DIR
#   bench/postgres.sh cost URL LOAD_BIN [load generator arguments...]
#       resets the database's statistics, runs the load generator with
#       --db URL, then prints per delivered message: statements by kind,
#       round trips (writer: two per batch, plus every statement whose answer
#       is awaited: queue reads, acks), transactions, and WAL bytes.
#
# The defaults of PostgreSQL 15 otherwise (shared_buffers 128 MB, fsync and
# synchronous_commit on): acknowledged means flushed to its WAL.

set -euo pipefail

bin=$(dirname "$(readlink -f "$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)")")
as_postgres() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case ${1:-} in
start)
    dir=$2 port=$3
    mkdir -p "$dir"
    [[ $(id -u) == 0 ]] && chown postgres:postgres "$dir"
    as_postgres "$bin/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --locale=C >/dev/null
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w start -o \
        "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_preload_libraries=pg_stat_statements" >/dev/null
    psql -qh "$dir" -p "$port" -U postgres -c "CREATE DATABASE bench" >/dev/null
    psql -qh "$dir" -p "$port" -U postgres -d bench -c "CREATE EXTENSION pg_stat_statements" >/dev/null
    echo "postgres://postgres@127.0.0.1:$port/bench"
    ;;
stop)
    dir=$2
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    rm -rf "$dir"
    ;;
cost)
    url=$2 load=$3
    shift 3
    psql -qAt "$url" -c "SELECT pg_stat_statements_reset(), pg_stat_reset_shared('wal'), pg_stat_reset()" >/dev/null
    out=$("$load" --db "$url" "$@" 2>&1)
    echo "$out" | grep -E '^(run|delivered|enqueue|node|2 nodes|PostgreSQL|load generator)' || true
    delivered=$(echo "$out" | sed -n 's/^delivered \([0-9]*\) of.*/\1/p' | tail -n1)
    psql -qAt "$url" -v delivered="$delivered" <<'SQL'
\pset footer off
SELECT format('per delivered message (%s): %s statements, %s writer batches (%s messages each), %s round trips, %s WAL bytes',
    :delivered,
    round(sum(calls)::numeric / :delivered, 2),
    round(sum(calls) FILTER (WHERE query = 'BEGIN')::numeric / :delivered, 4),
    round(:delivered::numeric / nullif(sum(calls) FILTER (WHERE query = 'BEGIN'), 0), 1),
    round((2 * sum(calls) FILTER (WHERE query = 'BEGIN')
           + sum(calls) FILTER (WHERE query LIKE 'SELECT seq, payload%' OR query LIKE 'WITH d AS%'
                                   OR query LIKE 'SELECT 1 FROM message_ids%' OR query LIKE 'INSERT INTO message_ids%')
           -- a batch of acks on one queue takes no lock up front: its delete
           -- goes with the BEGIN
           - coalesce(sum(calls) FILTER (WHERE query LIKE 'SET LOCAL synchronous_commit%'), 0))::numeric
          / :delivered, 3),
    round((SELECT wal_bytes FROM pg_stat_wal) / :delivered, 0))
FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database());
SELECT format('  %8s calls  %6s per msg  %7s ms  %s', calls, round(calls::numeric / :delivered, 3),
              round(mean_exec_time::numeric, 3), left(regexp_replace(query, '\s+', ' ', 'g'), 60))
FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY calls DESC LIMIT 12;
SQL
    ;;
*)
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
    exit 2
    ;;
esac
