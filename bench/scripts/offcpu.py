#!/usr/bin/env python3
"""Where spendflow's threads wait, weighted by time (bench/README.md, "Second pass").

    perf record -e sched:sched_switch --call-graph dwarf,16384 -o sw.data -- \
        target/release/spendflow run --input kafka:127.0.0.1:9092 --topic probe.keyed -w 2
    perf script -i sw.data -F comm,tid,time,trace,ip,sym > sw.txt
    bench/scripts/offcpu.py sw.txt

Each switch-out of a spendflow thread is weighted by the time to the same thread's next
switch-out (an approximation: it includes the run time in between, small for threads that
mostly sleep), and attributed to the first waiting frame of its stack and the nearest
spendflow/timely caller. Only the recorded process's switches are in the file.
"""
import sys, re, collections
events = []  # (tid, comm, time, stack)
cur = None
for line in open(sys.argv[1]):
    if not line.startswith('\t') and line.strip():
        # comm may contain spaces; find tid as first all-digit token followed by time
        m = re.match(r'^(.*?)\s+(\d+)\s+([\d.]+):\s+prev_comm=.*prev_state=(\S+)', line)
        if not m: cur=None; continue
        cur = [int(m.group(2)), m.group(1).strip(), float(m.group(3)), [], m.group(4)]
        events.append(cur)
    elif line.strip() and cur is not None:
        sym = line.strip().split(None,1)
        cur[3].append(sym[1] if len(sym)>1 else sym[0])
bytid = collections.defaultdict(list)
for e in events: bytid[e[0]].append(e)
agg = collections.defaultdict(lambda: collections.Counter())
tot = collections.Counter()
for tid, evs in bytid.items():
    for a, b in zip(evs, evs[1:]):
        gap = b[2]-a[2]
        comm = a[1]
        if not (comm.startswith('timely') or comm.startswith('spendflow')): continue
        st = a[3]
        # pick first "interesting" frame from top that is in our code or a known wait
        reason = None
        for f in st:
            if any(k in f for k in ['recv_timeout','Receiver<T>::recv','lll_lock_wait','step_or_park','Sender<T>::send','parking_lot','Condvar','rd_kafka_consumer_poll','sched_yield','asm_exc_page_fault','pthread_mutex','std::sync::poison::mutex','futex::Mutex','RwLock','idle_after_poll','rwlock']):
                reason = f[:70]; break
        if reason is None:
            reason = 'other:' + (next((f for f in st if 'spendflow' in f or 'timely' in f or 'differential' in f), st[-1] if st else '?'))[:70]
        # also find nearest spendflow caller
        caller = next((f for f in st if ('spendflow' in f or 'timely::' in f or 'differential' in f) ), '?')[:80]
        agg[comm][(reason, caller, a[4])] += gap
        tot[comm] += gap
for comm in sorted(agg):
    print(f"== {comm}: {tot[comm]:.2f}s between switch-outs")
    for (r,c,s), g in agg[comm].most_common(8):
        print(f"  {g:7.2f}s {s:2} {r} | {c}")
