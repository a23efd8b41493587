use super::consumer::owner_of;
use super::*;

#[test]
fn partitions_are_divided_stably_and_evenly() {
    for peers in [1, 2, 3, 4] {
        let mut counts = vec![0; peers];
        for user in 1..=400 {
            let topic = format!("expenses.user.{user}");
            let owner = owner_of(&topic, 0, peers);
            assert_eq!(owner, owner_of(&topic, 0, peers), "stable");
            counts[owner] += 1;
        }
        // Every worker gets a fair share (within 40% of even) of 400 single-partition topics.
        let even = 400 / peers;
        assert!(
            counts.iter().all(|c| *c * 10 >= even * 6),
            "{peers} workers: {counts:?}"
        );
    }
    // The value itself is part of the contract (a restart must give the same assignment).
    assert_eq!(owner_of("expenses", 3, 2), owner_of("expenses", 3, 2));
    assert_eq!(owner_of("t", 0, 1), 0);
}

#[test]
fn per_user_topics_name_their_user() {
    assert_eq!(
        user_of_topic("expenses.user.42", "expenses.user."),
        Some(42)
    );
    assert_eq!(user_of_topic("expenses.user.0", "expenses.user."), None);
    assert_eq!(user_of_topic("expenses.user.4x", "expenses.user."), None);
    assert_eq!(user_of_topic("expenses.user.", "expenses.user."), None);
    assert_eq!(user_of_topic("expenses", "expenses.user."), None);
}

#[test]
fn config_needs_exactly_one_topic_setting() {
    assert!(
        KafkaSourceConfig::pattern("127.0.0.1:9092", r"expenses\.user\..*")
            .validate()
            .is_ok()
    );
    assert!(
        KafkaSourceConfig::topic("127.0.0.1:9092", "expenses")
            .validate()
            .is_ok()
    );
    let mut both = KafkaSourceConfig::topic("127.0.0.1:9092", "expenses");
    both.topic_pattern = Some("x".into());
    assert!(both.validate().unwrap_err().0.contains("exactly one"));
    let bad = KafkaSourceConfig::pattern("127.0.0.1:9092", "(");
    assert!(bad.validate().unwrap_err().0.contains("regex"));
    let unknown = serde_json::from_str::<KafkaSourceConfig>(r#"{"brokers":"b","topik":"x"}"#);
    assert!(unknown.unwrap_err().to_string().contains("unknown field"));
}
