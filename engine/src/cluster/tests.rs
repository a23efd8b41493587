use super::*;

#[test]
fn parses_lines_comments_and_blank_lines() {
    let text = "# the cluster\n10.0.0.1:2101 10.0.0.1:50051\n\n  10.0.0.2:2101   10.0.0.2:50051 # second\n";
    let spec = ClusterSpec::parse(text, 1).unwrap();
    assert_eq!(spec.processes.len(), 2);
    assert_eq!(spec.me().timely, "10.0.0.2:2101");
    assert_eq!(spec.me().grpc, "10.0.0.2:50051");
    assert_eq!(
        spec.share(),
        Share {
            process: 1,
            processes: 2
        }
    );
}

#[test]
fn refuses_bad_files_with_the_line() {
    let err = ClusterSpec::parse("a:1 b:2\nc:3\n", 0).unwrap_err();
    assert!(
        matches!(err, ClusterError::BadLine { line: 2, .. }),
        "{err}"
    );
    let err = ClusterSpec::parse("a:1 b:x\n", 0).unwrap_err();
    assert!(err.to_string().contains("not a port number"), "{err}");
    let err = ClusterSpec::parse("a:1 a:1\n", 0).unwrap_err();
    assert!(matches!(err, ClusterError::Duplicate { .. }), "{err}");
    assert_eq!(
        ClusterSpec::parse("# nothing\n", 0).unwrap_err(),
        ClusterError::Empty
    );
    let err = ClusterSpec::parse("a:1 b:2\n", 1).unwrap_err();
    assert_eq!(
        err,
        ClusterError::ProcessOutOfRange {
            process: 1,
            processes: 1
        }
    );
    assert!(err.to_string().contains("out of range"), "{err}");
}

#[test]
fn every_user_has_one_owner_process_and_all_processes_own_some() {
    let topology = Topology {
        process: 0,
        processes: 3,
        workers_per_process: 2,
    };
    let mut owned = [0usize; 3];
    for user in 0..3000u64 {
        owned[topology.owner_process(user)] += 1;
    }
    assert!(owned.iter().all(|&n| n > 500), "{owned:?}");
    assert_eq!(topology.global_worker(1), 1);
    let second = Topology {
        process: 1,
        ..topology
    };
    assert_eq!(second.global_worker(1), 3);
    assert_eq!(second.process_of_worker(3), 1);
}
