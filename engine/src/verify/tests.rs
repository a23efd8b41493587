//! The comparison and the paging driver against in-memory fakes of both sides.

use std::collections::BTreeMap;

use spendflow_operators::UserId;

use super::grpc::{format_month, month_requests, parse_month};
use super::{
    Aspect, MonthRange, Served, ServedPage, Truth, UserAggregates, VerifyError, VerifyOptions,
    compare_user, verify,
};

const NOV_2026: i32 = 2026 * 12 + 10;

/// A user with `n` expenses of `amount` in `groceries`, November 2026.
fn user(user_id: UserId, n: i64, amount: i64) -> UserAggregates {
    UserAggregates {
        user_id,
        count: n,
        total_minor: n * amount,
        by_category: BTreeMap::from([("groceries".to_string(), (n, n * amount))]),
        by_month: BTreeMap::from([(NOV_2026, (n, n * amount))]),
    }
}

struct FakeTruth(Vec<UserAggregates>);

impl Truth for FakeTruth {
    fn name(&self) -> &str {
        "mysql"
    }

    fn month_range(&mut self) -> Result<Option<MonthRange>, VerifyError> {
        let months = self.0.iter().flat_map(|u| u.by_month.keys().copied());
        let (first, last) = months.fold((i32::MAX, i32::MIN), |(a, b), m| (a.min(m), b.max(m)));
        Ok((first <= last).then_some(MonthRange { first, last }))
    }

    fn users(
        &mut self,
        after: Option<UserId>,
        upto: Option<UserId>,
    ) -> Result<Vec<UserAggregates>, VerifyError> {
        Ok(self
            .0
            .iter()
            .filter(|u| after.is_none_or(|a| u.user_id > a) && upto.is_none_or(|b| u.user_id <= b))
            .cloned()
            .collect())
    }
}

/// The served side in memory, paged like `ListUserSummaries`.
struct FakeServed {
    users: Vec<UserAggregates>,
    next: usize,
    ready: bool,
    months_asked: Vec<Option<MonthRange>>,
}

impl FakeServed {
    fn new(users: Vec<UserAggregates>) -> Self {
        FakeServed {
            users,
            next: 0,
            ready: true,
            months_asked: Vec::new(),
        }
    }
}

impl Served for FakeServed {
    fn name(&self) -> &str {
        "grpc"
    }

    fn wait_ready(&mut self, timeout: std::time::Duration) -> Result<(), VerifyError> {
        if self.ready {
            Ok(())
        } else {
            Err(VerifyError::NotReady {
                waited: timeout,
                detail: "lagging".into(),
            })
        }
    }

    fn next_page(
        &mut self,
        page_size: usize,
        months: Option<MonthRange>,
    ) -> Result<ServedPage, VerifyError> {
        self.months_asked.push(months);
        let end = (self.next + page_size).min(self.users.len());
        let users = self.users[self.next..end].to_vec();
        self.next = end;
        Ok(ServedPage {
            users,
            more: end < self.users.len(),
        })
    }
}

fn options(page_size: usize) -> VerifyOptions {
    VerifyOptions {
        page_size,
        max_reported: 20,
        wait_ready: std::time::Duration::from_secs(1),
    }
}

#[test]
fn equal_sides_agree_whatever_the_page_size() {
    let users: Vec<_> = (1..=57)
        .map(|u| user(u * 3, u as i64 % 5 + 1, 100))
        .collect();
    for page_size in [1, 2, 7, 56, 57, 1000] {
        let mut truth = FakeTruth(users.clone());
        let mut served = FakeServed::new(users.clone());
        let report = verify(&mut truth, &mut served, &options(page_size)).unwrap();
        assert!(report.is_ok(), "page size {page_size}: {report}");
        assert_eq!(report.users_checked, 57);
        assert_eq!((report.users_truth, report.users_served), (57, 57));
        assert_eq!(
            report.expenses_truth,
            users.iter().map(|u| u.count).sum::<i64>()
        );
        assert_eq!(
            served.months_asked[0],
            Some(MonthRange {
                first: NOV_2026,
                last: NOV_2026
            })
        );
        assert!(report.to_string().contains("0 mismatches"));
    }
}

#[test]
fn users_on_one_side_only_are_found_between_and_after_pages() {
    // Truth has users the served side lacks: before the first served user, between pages and
    // after the last; the served side has one the truth lacks.
    let truth_users: Vec<_> = [1, 2, 5, 6, 9, 20, 30].map(|u| user(u, 1, 10)).into();
    let served_users: Vec<_> = [2, 5, 7, 9].map(|u| user(u, 1, 10)).into();
    let mut truth = FakeTruth(truth_users);
    let mut served = FakeServed::new(served_users);
    let report = verify(&mut truth, &mut served, &options(2)).unwrap();
    let mut missing_served: Vec<UserId> = report
        .mismatches
        .iter()
        .filter(|m| m.aspect == Aspect::MissingServed)
        .map(|m| m.user_id)
        .collect();
    missing_served.sort_unstable();
    assert_eq!(missing_served, [1, 6, 20, 30]);
    let missing_truth: Vec<UserId> = report
        .mismatches
        .iter()
        .filter(|m| m.aspect == Aspect::MissingTruth)
        .map(|m| m.user_id)
        .collect();
    assert_eq!(missing_truth, [7]);
    assert_eq!(report.users_checked, 8);
    assert_eq!(report.mismatch_count, 5);
    assert_eq!(report.mismatched_users, 5);
    assert!(!report.is_ok());
}

#[test]
fn every_aggregate_difference_is_reported_with_both_values() {
    let truth = user(4, 3, 100);
    let mut served = truth.clone();
    served.total_minor += 1;
    served.by_category.insert("groceries".into(), (3, 301));
    served.by_category.insert("travel".into(), (1, 5));
    served.by_month.insert(NOV_2026, (3, 301));
    let diffs = compare_user(&truth, &served);
    let aspects: Vec<&Aspect> = diffs.iter().map(|m| &m.aspect).collect();
    assert_eq!(
        aspects,
        [
            &Aspect::User,
            &Aspect::Category("groceries".into()),
            &Aspect::Category("travel".into()),
            &Aspect::Month(NOV_2026),
        ]
    );
    assert_eq!(diffs[0].truth, Some((3, 300)));
    assert_eq!(diffs[0].served, Some((3, 301)));
    assert_eq!(diffs[2].truth, None);
    let line = diffs[3].describe("mysql", "grpc");
    assert_eq!(
        line,
        "user 4 month 2026-11: mysql 3 expenses, total 300 | grpc 3 expenses, total 301"
    );
}

#[test]
fn served_months_that_do_not_add_up_are_a_mismatch() {
    let truth = user(8, 2, 50);
    let mut served = truth.clone();
    // The truth also lacks this month, so this shows as a month mismatch; the served
    // months no longer summing to the served total is reported too.
    served.by_month.insert(NOV_2026 - 1, (1, 7));
    let aspects: Vec<Aspect> = compare_user(&truth, &served)
        .into_iter()
        .map(|m| m.aspect)
        .collect();
    assert!(aspects.contains(&Aspect::Month(NOV_2026 - 1)));
    assert!(aspects.contains(&Aspect::MonthsIncomplete));
}

#[test]
fn only_the_first_mismatches_are_kept_but_all_are_counted() {
    let truth_users: Vec<_> = (1..=50).map(|u| user(u, 1, 10)).collect();
    let served_users: Vec<_> = (1..=50).map(|u| user(u, 1, 11)).collect();
    let mut opts = options(10);
    opts.max_reported = 20;
    let report = verify(
        &mut FakeTruth(truth_users),
        &mut FakeServed::new(served_users),
        &opts,
    )
    .unwrap();
    // Each user differs in total, category and month.
    assert_eq!(report.mismatch_count, 150);
    assert_eq!(report.mismatched_users, 50);
    assert_eq!(report.mismatches.len(), 20);
    let text = report.to_string();
    assert!(
        text.contains("150 mismatches in 50 users; the first 20"),
        "{text}"
    );
    assert!(text.contains("user 1 total: mysql 1 expenses, total 10 | grpc 1 expenses, total 11"));
}

#[test]
fn an_empty_truth_against_an_empty_engine_agrees() {
    let report = verify(
        &mut FakeTruth(Vec::new()),
        &mut FakeServed::new(Vec::new()),
        &options(100),
    )
    .unwrap();
    assert!(report.is_ok());
    assert_eq!(report.users_checked, 0);
}

#[test]
fn a_served_side_that_is_not_ready_fails_without_a_report() {
    let mut served = FakeServed::new(Vec::new());
    served.ready = false;
    let e = verify(&mut FakeTruth(Vec::new()), &mut served, &options(10)).unwrap_err();
    assert!(matches!(e, VerifyError::NotReady { .. }));
    assert!(e.is_retriable());
    let mut no_wait = options(10);
    no_wait.wait_ready = std::time::Duration::ZERO;
    assert!(verify(&mut FakeTruth(Vec::new()), &mut served, &no_wait).is_ok());
    no_wait.page_size = 0;
    assert!(matches!(
        verify(&mut FakeTruth(Vec::new()), &mut served, &no_wait),
        Err(VerifyError::Config(_))
    ));
}

#[test]
fn month_requests_cover_the_range_in_service_sized_chunks() {
    let range = Some(MonthRange {
        first: NOV_2026 - 2,
        last: NOV_2026,
    });
    assert_eq!(month_requests(range, None), [(NOV_2026 - 2, NOV_2026)]);
    // Widened to the user's newest served event.
    assert_eq!(
        month_requests(range, Some(NOV_2026 + 3)),
        [(NOV_2026 - 2, NOV_2026 + 3)]
    );
    assert_eq!(month_requests(None, Some(NOV_2026)), [(NOV_2026, NOV_2026)]);
    assert!(month_requests(None, None).is_empty());
    // 2500 months need three requests of at most 1200.
    let wide = Some(MonthRange {
        first: 1500 * 12,
        last: 1500 * 12 + 2499,
    });
    let chunks = month_requests(wide, None);
    assert_eq!(chunks.len(), 3);
    assert!(chunks.iter().all(|(a, b)| b - a < 1200));
    assert_eq!(chunks[0].0, 1500 * 12);
    assert_eq!(chunks[2].1, 1500 * 12 + 2499);
    assert!(chunks.windows(2).all(|w| w[0].1 + 1 == w[1].0));
    // Clamped to four-digit years.
    let chunks = month_requests(
        Some(MonthRange {
            first: 0,
            last: 20_000 * 12,
        }),
        None,
    );
    assert_eq!(chunks.first().unwrap().0, 1000 * 12);
    assert_eq!(chunks.last().unwrap().1, 9999 * 12 + 11);
}

#[test]
fn months_format_and_parse_like_the_service() {
    assert_eq!(format_month(NOV_2026), "2026-11");
    assert_eq!(format_month(2027 * 12), "2027-01");
    assert_eq!(parse_month("2026-11"), Some(NOV_2026));
    assert_eq!(parse_month("2026-13"), None);
    assert_eq!(parse_month("26-11"), None);
    assert_eq!(parse_month("2026-1"), None);
    for m in [1000 * 12, NOV_2026, 9999 * 12 + 11] {
        assert_eq!(parse_month(&format_month(m)), Some(m));
    }
}

mod reference {
    use std::collections::{BTreeMap, BTreeSet};

    use super::super::reference::{
        RankedSpender, ReferenceMismatch, ReferenceServed, ReferenceTruth, compare, convert,
    };
    use super::*;

    fn ranked(list: &[(UserId, i64)]) -> Vec<RankedSpender> {
        list.iter()
            .map(|&(user_id, converted_minor)| RankedSpender {
                user_id,
                converted_minor,
            })
            .collect()
    }

    fn truth() -> ReferenceTruth {
        ReferenceTruth {
            fired: BTreeSet::from([(1, NOV_2026, 80), (1, NOV_2026, 100), (2, NOV_2026, 80)]),
            converted: Some(BTreeMap::from([(1, 500), (2, 900), (3, 500), (4, -20)])),
            budgets: budgets(),
        }
    }

    fn served() -> ReferenceServed {
        ReferenceServed {
            reporting_currency: Some("EUR".into()),
            has_reference: true,
            fired: truth().fired,
            // Users 1 and 3 tie: either order is right.
            ranking: ranked(&[(2, 900), (3, 500), (1, 500), (4, -20)]),
            limit: 1000,
            budgets: budgets(),
        }
    }

    fn budgets() -> BTreeMap<UserId, (i64, String)> {
        BTreeMap::from([(1, (1_000, "EUR".to_string())), (2, (0, "SEK".to_string()))])
    }

    #[test]
    fn a_budget_or_currency_that_differs_is_a_mismatch() {
        let mut served = served();
        // A user with no row in the truth is served without budget or currency: agrees.
        served.budgets.insert(9, (0, String::new()));
        let report = compare(Some(&truth()), Some(&served), 20).unwrap();
        assert_eq!(report.mismatch_count, 0, "{report:?}");
        assert_eq!(report.budgets_checked, Some(3));
        served.budgets.insert(1, (999, "EUR".into()));
        served.budgets.insert(2, (0, "NOK".into()));
        served.budgets.insert(9, (5, "EUR".into()));
        let report = compare(Some(&truth()), Some(&served), 20).unwrap();
        let text: Vec<String> = report
            .mismatches
            .iter()
            .map(|m| m.describe("mysql", "grpc"))
            .collect();
        assert_eq!(
            text,
            [
                "user 1 budget: mysql 1000 \"EUR\" | grpc 999 \"EUR\"",
                "user 2 budget: mysql 0 \"SEK\" | grpc 0 \"NOK\"",
                "user 9 budget: mysql absent | grpc 5 \"EUR\"",
            ]
        );
    }

    #[test]
    fn equal_sides_agree_and_ties_may_rank_either_way() {
        let report = compare(Some(&truth()), Some(&served()), 20).unwrap();
        assert_eq!(report.mismatch_count, 0, "{report:?}");
        assert_eq!(report.alerts_checked, Some(3));
        assert_eq!(report.spenders_checked, Some(4));
    }

    #[test]
    fn an_alert_on_one_side_only_is_a_mismatch_each_way() {
        let mut served = served();
        served.fired.remove(&(1, NOV_2026, 100));
        served.fired.insert((3, NOV_2026, 80));
        let report = compare(Some(&truth()), Some(&served), 20).unwrap();
        assert_eq!(report.mismatch_count, 2);
        assert_eq!(
            report.mismatches,
            [
                ReferenceMismatch::Alert {
                    key: (1, NOV_2026, 100),
                    truth: true
                },
                ReferenceMismatch::Alert {
                    key: (3, NOV_2026, 80),
                    truth: false
                },
            ]
        );
        assert_eq!(
            report.mismatches[0].describe("mysql", "grpc"),
            "user 1 alert 2026-11 100%: fired in mysql, not in grpc"
        );
    }

    #[test]
    fn a_wrong_amount_and_a_wrong_order_are_mismatches() {
        let mut served = served();
        // User 3 converted wrong (and so ranked wrong), user 4 missing from the ranking.
        served.ranking = ranked(&[(3, 950), (2, 900), (1, 500)]);
        let report = compare(Some(&truth()), Some(&served), 20).unwrap();
        let text: Vec<String> = report
            .mismatches
            .iter()
            .map(|m| m.describe("mysql", "grpc"))
            .collect();
        assert!(
            text.contains(&"user 3 converted total: mysql 500 | grpc 950".to_string()),
            "{text:?}"
        );
        assert!(
            text.contains(&"converted ranking, rank 1: mysql 900 | grpc 950".to_string()),
            "{text:?}"
        );
        assert!(
            text.contains(&"converted ranking, rank 4: mysql -20 | grpc absent".to_string()),
            "{text:?}"
        );
        // A user the truth cannot convert (no rate) must not be ranked.
        let mut served = self::served();
        served.ranking.push(RankedSpender {
            user_id: 9,
            converted_minor: -30,
        });
        let report = compare(Some(&truth()), Some(&served), 20).unwrap();
        assert!(report.mismatches.contains(&ReferenceMismatch::Converted {
            user_id: 9,
            truth: None,
            served: -30
        }));
    }

    #[test]
    fn a_full_page_ranks_only_the_top() {
        let mut served = served();
        served.limit = 2;
        served.ranking.truncate(2);
        let report = compare(Some(&truth()), Some(&served), 20).unwrap();
        assert_eq!(report.mismatch_count, 0, "{report:?}");
        served.ranking = ranked(&[(2, 900), (4, -20)]);
        let report = compare(Some(&truth()), Some(&served), 20).unwrap();
        assert!(report.mismatch_count > 0);
    }

    #[test]
    fn checks_are_skipped_with_a_note() {
        let report = compare(None, Some(&served()), 20).unwrap();
        assert!(report.notes[0].contains("no fx_rates table"), "{report:?}");
        assert_eq!(report.alerts_checked, None);
        let no_ref = ReferenceServed {
            has_reference: false,
            ..served()
        };
        let report = compare(Some(&truth()), Some(&no_ref), 20).unwrap();
        assert!(report.notes[0].contains("--mysql-cdc"), "{report:?}");
        let no_currency = ReferenceServed {
            reporting_currency: None,
            ranking: Vec::new(),
            ..served()
        };
        let report = compare(Some(&truth()), Some(&no_currency), 20).unwrap();
        assert_eq!(report.alerts_checked, Some(3));
        assert_eq!(report.spenders_checked, None);
        assert!(
            report.notes[0].contains("no reporting currency"),
            "{report:?}"
        );
        assert!(compare(Some(&truth()), None, 20).is_none());
    }

    #[test]
    fn reference_mismatches_fail_the_report_and_are_printed() {
        let mut served_side = WithReference(FakeServed::new(vec![user(1, 1, 100)]), served());
        let mut truth_side = WithTruth(FakeTruth(vec![user(1, 1, 100)]), {
            let mut t = truth();
            t.fired.insert((4, NOV_2026, 100));
            t
        });
        let report = verify(&mut truth_side, &mut served_side, &options(10)).unwrap();
        assert!(!report.is_ok());
        assert_eq!(report.mismatch_count, 0);
        let text = report.to_string();
        assert!(
            text.contains("user 4 alert 2026-11 100%: fired in mysql, not in grpc"),
            "{text}"
        );
        assert!(text.contains("alerts: 4 fired alerts checked"), "{text}");
    }

    #[test]
    fn conversion_rounds_half_away_from_zero() {
        assert_eq!(convert(1, 500_000), 1);
        assert_eq!(convert(-1, 500_000), -1);
        assert_eq!(convert(1, 499_999), 0);
        assert_eq!(convert(12_345, 1_000_000), 12_345);
        assert_eq!(convert(-3, 1_500_000), -5);
    }

    struct WithTruth(FakeTruth, ReferenceTruth);

    impl Truth for WithTruth {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn month_range(&mut self) -> Result<Option<MonthRange>, VerifyError> {
            self.0.month_range()
        }
        fn users(
            &mut self,
            after: Option<UserId>,
            upto: Option<UserId>,
        ) -> Result<Vec<UserAggregates>, VerifyError> {
            self.0.users(after, upto)
        }
        fn reference(
            &mut self,
            reporting_currency: Option<&str>,
        ) -> Result<Option<ReferenceTruth>, VerifyError> {
            assert_eq!(reporting_currency, Some("EUR"));
            Ok(Some(self.1.clone()))
        }
    }

    struct WithReference(FakeServed, ReferenceServed);

    impl Served for WithReference {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn next_page(
            &mut self,
            page_size: usize,
            months: Option<MonthRange>,
        ) -> Result<ServedPage, VerifyError> {
            self.0.next_page(page_size, months)
        }
        fn reference(&mut self) -> Result<Option<ReferenceServed>, VerifyError> {
            Ok(Some(self.1.clone()))
        }
    }
}
