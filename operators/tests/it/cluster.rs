//! Two processes of a cluster, joined by `runtime::connect` inside this test process: the
//! hellos go round, the workers are global, data crosses between them, and a process whose
//! peers never come gets a bounded, clear error.

use std::net::TcpListener;
use std::time::Duration;

use spendflow_operators::runtime::{self, ConnectError, Placement};
use timely::dataflow::operators::{Exchange, Inspect, Probe, ToStream};

fn free_addrs(n: usize) -> Vec<String> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect()
}

#[test]
fn two_processes_exchange_data_and_hellos() {
    let addrs = free_addrs(2);
    let threads = 2;
    let joins: Vec<_> = (0..2)
        .map(|p| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let hello = format!("hello from {p}");
                let connected = runtime::connect(
                    &addrs,
                    p,
                    threads,
                    hello.as_bytes(),
                    Duration::from_secs(20),
                )
                .unwrap();
                let hellos: Vec<String> = connected
                    .hellos()
                    .iter()
                    .map(|h| String::from_utf8(h.clone()).unwrap())
                    .collect();
                assert_eq!(hellos, vec!["hello from 0", "hello from 1"]);
                runtime::execute_on(Placement::Cluster(connected), |ctx| {
                    let (index, peers) = (ctx.index(), ctx.peers());
                    ctx.with_worker(|worker| {
                        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
                        let sink = seen.clone();
                        let probe = worker.dataflow::<u64, _, _>(|scope| {
                            // Every worker sends 0..100 tagged with its index; each number goes
                            // to worker `n % peers`.
                            let numbers: timely::dataflow::Stream<'_, u64, Vec<(u64, usize)>> =
                                (0..100u64).map(move |n| (n, index)).to_stream(scope);
                            numbers
                                .exchange(|(n, _)| *n)
                                .inspect(move |x: &(u64, usize)| sink.borrow_mut().push(*x))
                                .probe()
                                .0
                        });
                        while !probe.done() {
                            worker.step();
                        }
                        let mut seen = seen.borrow().clone();
                        seen.sort_unstable();
                        (index, peers, seen)
                    })
                })
                .unwrap()
            })
        })
        .collect();
    let mut all = Vec::new();
    for join in joins {
        all.extend(join.join().unwrap());
    }
    all.sort_unstable_by_key(|(index, _, _)| *index);
    assert_eq!(all.len(), 4, "two processes of two workers");
    for (index, peers, seen) in &all {
        assert_eq!(*peers, 4);
        // Worker i gets every n with n % 4 == i, once from each of the 4 workers.
        let expected: Vec<(u64, usize)> = (0..100u64)
            .filter(|n| *n as usize % 4 == *index)
            .flat_map(|n| (0..4).map(move |from| (n, from)))
            .collect();
        let mut expected = expected;
        expected.sort_unstable();
        assert_eq!(seen, &expected, "worker {index}");
    }
    let (sent, received) = runtime::cluster_bytes();
    assert!(
        sent > 0 && received > 0,
        "bytes crossed between the processes"
    );
}

#[test]
fn a_peer_that_never_comes_is_a_bounded_clear_error() {
    let addrs = free_addrs(3);
    let started = std::time::Instant::now();
    let err = runtime::connect(&addrs, 1, 1, b"", Duration::from_secs(1)).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "bounded");
    match &err {
        ConnectError::Timeout { missing, .. } => {
            let missing: Vec<usize> = missing.iter().map(|(p, _)| *p).collect();
            assert_eq!(missing, vec![0, 2]);
        }
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(err.to_string().contains("process 0"), "{err}");
}

#[test]
fn peers_with_other_worker_counts_are_refused() {
    let addrs = free_addrs(2);
    let other = {
        let addrs = addrs.clone();
        std::thread::spawn(move || runtime::connect(&addrs, 1, 2, b"", Duration::from_secs(3)))
    };
    let ours = runtime::connect(&addrs, 0, 1, b"", Duration::from_secs(10));
    let theirs = other.join().unwrap();
    let err = ours.err().or(theirs.err()).expect("someone refuses");
    assert!(err.to_string().contains("same -w"), "{err}");
}
