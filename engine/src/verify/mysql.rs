//! The truth: SQL over the live `expenses` table of `spendflow generate`'s database.
//!
//! Each page is one `GROUP BY user_id, category, month` over the page's range of users; the
//! per-user, per-category and per-month aggregates are sums of its cells. All queries run in
//! one `REPEATABLE READ` transaction started `WITH CONSISTENT SNAPSHOT`, so every page sees the
//! same state of the table even if a generator is still writing. Months are computed by the
//! server from `event_time` (`YEAR * 12 + MONTH - 1`), independently of the engine's own
//! calendar arithmetic.

use std::collections::BTreeMap;

use ::mysql::Conn;
use ::mysql::prelude::Queryable;
use spendflow_operators::UserId;

use super::reference::ReferenceTruth;
use super::{MonthRange, Truth, UserAggregates, VerifyError};
use crate::mysql_client::MySqlError;

/// The live expenses in MySQL.
pub struct MySqlTruth {
    conn: Conn,
    database: String,
}

impl std::fmt::Debug for MySqlTruth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlTruth")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

fn mysql_error(context: &str) -> impl FnOnce(::mysql::Error) -> VerifyError + '_ {
    move |source| VerifyError::MySql {
        context: context.to_string(),
        source,
    }
}

/// Month bucket of `event_time`, as the engine numbers months.
const MONTH_SQL: &str = "(YEAR(event_time) * 12 + MONTH(event_time) - 1)";

impl MySqlTruth {
    /// Connects to the URL's database (it must exist) and opens a consistent snapshot.
    ///
    /// # Errors
    ///
    /// [`VerifyError::Config`] for a bad URL, [`VerifyError::MySql`] if the server, the
    /// database or the `expenses` table cannot be reached.
    pub fn connect(url: &str) -> Result<Self, VerifyError> {
        let (mut conn, database) =
            crate::mysql_client::connect(url, false).map_err(|e| match e {
                MySqlError::Driver { context, source } => VerifyError::MySql { context, source },
                other => VerifyError::Config(other.to_string()),
            })?;
        conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .map_err(mysql_error("set the isolation level"))?;
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            .map_err(mysql_error("open a snapshot"))?;
        Ok(MySqlTruth { conn, database })
    }

    /// The database name.
    pub fn database(&self) -> &str {
        &self.database
    }
}

/// `user_id > ? AND user_id <= ?` bounds for an `(after, upto]` range.
fn bounds(after: Option<UserId>, upto: Option<UserId>) -> (u64, u64) {
    (after.unwrap_or(0), upto.unwrap_or(u64::MAX))
}

impl Truth for MySqlTruth {
    fn name(&self) -> &str {
        "mysql"
    }

    fn month_range(&mut self) -> Result<Option<MonthRange>, VerifyError> {
        let row: Option<(Option<i64>, Option<i64>)> = self
            .conn
            .query_first(format!(
                "SELECT MIN({MONTH_SQL}), MAX({MONTH_SQL}) FROM expenses"
            ))
            .map_err(mysql_error("read the month range"))?;
        Ok(match row {
            Some((Some(first), Some(last))) => Some(MonthRange {
                first: first as i32,
                last: last as i32,
            }),
            _ => None,
        })
    }

    fn users(
        &mut self,
        after: Option<UserId>,
        upto: Option<UserId>,
    ) -> Result<Vec<UserAggregates>, VerifyError> {
        // One grouped scan per page; totals, categories and months are sums of its cells.
        let cells: Vec<(u64, Vec<u8>, i64, i64, i64)> = self
            .conn
            .exec(
                format!(
                    "SELECT user_id, category, {MONTH_SQL} AS month, COUNT(*), \
                     CAST(SUM(amount_minor) AS SIGNED) FROM expenses \
                     WHERE user_id > ? AND user_id <= ? GROUP BY user_id, category, month"
                ),
                bounds(after, upto),
            )
            .map_err(mysql_error("sum per user, category and month"))?;
        let mut users: BTreeMap<UserId, UserAggregates> = BTreeMap::new();
        for (user_id, category, month, count, total) in cells {
            let user = users.entry(user_id).or_insert_with(|| UserAggregates {
                user_id,
                ..UserAggregates::default()
            });
            user.count += count;
            user.total_minor += total;
            let c = user
                .by_category
                .entry(String::from_utf8_lossy(&category).into_owned())
                .or_default();
            *c = (c.0 + count, c.1 + total);
            let m = user.by_month.entry(month as i32).or_default();
            *m = (m.0 + count, m.1 + total);
        }
        Ok(users.into_values().collect())
    }

    fn reference(
        &mut self,
        reporting_currency: Option<&str>,
    ) -> Result<Option<ReferenceTruth>, VerifyError> {
        let tables: Option<i64> = self
            .conn
            .query_first(
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = DATABASE() AND table_name = 'fx_rates'",
            )
            .map_err(mysql_error("look for the fx_rates table"))?;
        if tables.unwrap_or(0) == 0 {
            return Ok(None);
        }
        // The alert rule in SQL: per user and month with a live expense, each threshold whose
        // `spend * 100 >= budget * threshold` (exact DECIMAL arithmetic), budget above 0.
        let fired: Vec<(u64, i64, u8)> = self
            .conn
            .query(format!(
                "SELECT s.user_id, s.month, t.pct FROM ( \
                   SELECT e.user_id, {MONTH_SQL_E} AS month, SUM(e.amount_minor) AS spent, \
                     u.monthly_budget_minor AS budget \
                   FROM expenses e JOIN users u ON u.user_id = e.user_id \
                   WHERE u.monthly_budget_minor > 0 \
                   GROUP BY e.user_id, month, u.monthly_budget_minor) s \
                 JOIN (SELECT 80 AS pct UNION ALL SELECT 100) t \
                   ON s.spent * 100 >= CAST(s.budget AS DECIMAL(40, 0)) * t.pct \
                 ORDER BY s.user_id, s.month, t.pct"
            ))
            .map_err(mysql_error("compute the fired alerts"))?;
        let fired = fired
            .into_iter()
            .map(|(user, month, pct)| (user, month as i32, pct))
            .collect();
        let converted = match reporting_currency {
            None => None,
            Some(reporting) => {
                // The conversion rule in SQL, exactly: p = total * rate (DECIMAL), then p / 10^6
                // rounded half away from zero with DIV (truncates) and MOD (sign of p). (Not
                // ROUND(p / 1000000): the division keeps only div_precision_increment
                // decimals, which would round twice.)
                let rows: Vec<(u64, String)> = self
                    .conn
                    .exec(
                        "SELECT x.user_id, CAST(x.p DIV 1000000 \
                           + CASE WHEN ABS(x.p MOD 1000000) * 2 >= 1000000 THEN SIGN(x.p) ELSE 0 END \
                           AS CHAR) FROM ( \
                           SELECT e.user_id, SUM(e.amount_minor) * \
                             (CASE WHEN u.currency = ? THEN 1000000 ELSE f.rate_micros END) AS p \
                           FROM expenses e JOIN users u ON u.user_id = e.user_id \
                           LEFT JOIN fx_rates f ON f.currency = u.currency \
                           GROUP BY e.user_id, u.currency, f.rate_micros) x \
                         WHERE x.p IS NOT NULL",
                        (reporting,),
                    )
                    .map_err(mysql_error("convert the users' totals"))?;
                let mut out = BTreeMap::new();
                for (user, amount) in rows {
                    let amount: i128 = amount.trim().parse().map_err(|_| {
                        VerifyError::Config(format!(
                            "MySQL returned {amount:?} as user {user}'s converted total"
                        ))
                    })?;
                    out.insert(user, amount);
                }
                Some(out)
            }
        };
        let budgets: Vec<(u64, i64, String)> = self
            .conn
            .query(
                "SELECT u.user_id, COALESCE(u.monthly_budget_minor, 0), u.currency FROM users u \
                 WHERE EXISTS (SELECT 1 FROM expenses e WHERE e.user_id = u.user_id)",
            )
            .map_err(mysql_error("read the users' budgets"))?;
        let budgets = budgets
            .into_iter()
            .map(|(user, budget, currency)| (user, (budget, currency)))
            .collect();
        Ok(Some(ReferenceTruth {
            fired,
            converted,
            budgets,
        }))
    }
}

/// [`MONTH_SQL`] of the expenses aliased `e`.
const MONTH_SQL_E: &str = "(YEAR(e.event_time) * 12 + MONTH(e.event_time) - 1)";
