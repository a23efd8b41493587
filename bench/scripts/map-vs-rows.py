#!/usr/bin/env python3
"""Cassandra's CPU per written cell: one clustering row per cell against one map entry per cell
(bench/README.md, "Fifth pass": the schema lever, measured before building it).

    python3 -m venv /tmp/cqlvenv && /tmp/cqlvenv/bin/pip install cassandra-driver
    CPID=$(pgrep -f org.apache.cassandra.service.CassandraDaemon) \\
        /tmp/cqlvenv/bin/python bench/scripts/map-vs-rows.py rows|maps [ROUNDS=5]

Each round writes 20 random merchants (of 200) for each of 10,000 users, as the sink writes a
group: `rows` as one unlogged single-partition batch of 20 `INSERT ... USING TIMESTAMP` per
user into a table keyed `(user_id, merchant)` (the `user_merchant_totals` shape); `maps` as one
`UPDATE ... USING TIMESTAMP ? SET merchants = merchants + ?` of 20 entries per user into a
table keyed by `user_id` alone. 32 requests in flight. Prints the CPU time Cassandra's process
used (utime + stime of CPID) per cell written, for a fresh keyspace it drops at the end.
"""
import os
import random
import sys
import time

from cassandra.cluster import Cluster
from cassandra.concurrent import execute_concurrent
from cassandra.query import BatchStatement, BatchType


def cassandra_cpu():
    fields = open(f"/proc/{os.environ['CPID']}/stat").read().split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def main():
    mode = sys.argv[1]
    if mode not in ("rows", "maps"):
        sys.exit(__doc__)
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    users, per_user = 10_000, 20
    session = Cluster(["127.0.0.1"], port=9042).connect()
    ks = f"mvr_{mode}_{int(time.time())}"
    session.execute(
        f"CREATE KEYSPACE {ks} WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    session.execute(
        f"CREATE TABLE {ks}.rows (user_id bigint, merchant text, total_minor bigint, "
        "expense_count bigint, epoch bigint, PRIMARY KEY (user_id, merchant))"
    )
    session.execute(
        f"CREATE TABLE {ks}.maps (user_id bigint PRIMARY KEY, "
        "merchants map<text, frozen<tuple<bigint, bigint, bigint>>>)"
    )
    insert = session.prepare(
        f"INSERT INTO {ks}.rows (user_id, merchant, total_minor, expense_count, epoch) "
        "VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
    )
    update = session.prepare(
        f"UPDATE {ks}.maps USING TIMESTAMP ? SET merchants = merchants + ? WHERE user_id = ?"
    )
    rng = random.Random(1)
    stamp = int(time.time() * 1e6)
    cells = 0
    cpu0, t0 = cassandra_cpu(), time.time()
    for epoch in range(rounds):
        statements = []
        for user in range(1, users + 1):
            merchants = rng.sample(range(200), per_user)
            stamp += 1
            if mode == "rows":
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                for m in merchants:
                    values = (rng.randrange(10**6), rng.randrange(100), epoch)
                    batch.add(insert, (user, f"merchant-{m}", *values, stamp))
                statements.append((batch, ()))
            else:
                entries = {
                    f"merchant-{m}": (rng.randrange(10**6), rng.randrange(100), epoch)
                    for m in merchants
                }
                statements.append((update, (stamp, entries, user)))
            cells += per_user
        execute_concurrent(session, statements, concurrency=32, raise_on_first_error=True)
    cpu1, t1 = cassandra_cpu(), time.time()
    print(
        f"{mode}: {cells} cells in {t1 - t0:.1f} s, Cassandra CPU {cpu1 - cpu0:.1f} s = "
        f"{(cpu1 - cpu0) / cells * 1e6:.1f} us per cell"
    )
    session.execute(f"DROP KEYSPACE {ks}")


if __name__ == "__main__":
    main()
