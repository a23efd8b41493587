#!/usr/bin/env python3
"""How long spendflow's threads wait for a CPU (bench/README.md, "Fifth pass").

    bench/scripts/runqueue.py sample [BINARY_NAME] > rq.log &   # during the run; kill it after
    bench/scripts/runqueue.py window rq.log 00:53:31.4 00:53:43.6

`sample` reads /proc/<pid>/task/<tid>/schedstat of every `<BINARY_NAME> run` process
(`spendflow` unless given) twice a second: CPU time and time spent runnable but waiting on a run queue (ns), per thread.
`window` sums, per thread name, the growth of both between two UTC times of that day (take
them from the engine's log, e.g. the first and last published epoch of a freshness window).
"""
import collections
import datetime
import os
import sys
import time


def sample(name):
    while True:
        now = time.time()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if len(cmd) < 2 or os.path.basename(cmd[0]) != name or cmd[1] != b"run":
                continue
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip().replace(" ", "_")
                    cpu, wait, _ = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()
                except (OSError, ValueError):
                    continue
                print(f"{now:.3f} {pid} {tid} {comm} {cpu} {wait}", flush=True)
        time.sleep(0.5)


def window(path, start, end):
    day = None
    rows = collections.defaultdict(dict)  # time -> (pid, tid) -> (comm, cpu, wait)
    for line in open(path):
        t, pid, tid, comm, cpu, wait = line.split()
        rows[float(t)][(pid, tid)] = (comm, int(cpu), int(wait))
        day = day or datetime.datetime.fromtimestamp(float(t), datetime.timezone.utc).date()

    def ts(hms):
        clock = datetime.datetime.strptime(hms, "%H:%M:%S.%f").time()
        return datetime.datetime.combine(day, clock, datetime.timezone.utc).timestamp()

    s, e = ts(start), ts(end)
    times = sorted(t for t in rows if s <= t <= e)
    if len(times) < 2:
        sys.exit("fewer than two samples in the window")
    first, last = rows[times[0]], rows[times[-1]]
    cpu = collections.Counter()
    wait = collections.Counter()
    for key, (comm, c1, w1) in last.items():
        _, c0, w0 = first.get(key, (comm, 0, 0))
        cpu[comm] += (c1 - c0) / 1e9
        wait[comm] += (w1 - w0) / 1e9
    print(f"{times[-1] - times[0]:.1f} s: thread, CPU s, run-queue wait s")
    for comm in sorted(cpu):
        if cpu[comm] > 0.05 or wait[comm] > 0.05:
            print(f"  {comm:18s} {cpu[comm]:6.2f} {wait[comm]:6.2f}")
    print(f"  {'all':18s} {sum(cpu.values()):6.2f} {sum(wait.values()):6.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["sample"] and len(sys.argv) <= 3:
        sample((sys.argv[2] if len(sys.argv) == 3 else "spendflow").encode())
    elif sys.argv[1:2] == ["window"] and len(sys.argv) == 5:
        window(*sys.argv[2:])
    else:
        sys.exit(__doc__)
