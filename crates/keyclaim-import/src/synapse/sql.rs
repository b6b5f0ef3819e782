//! The queries, the same for both databases but for placeholders and
//! collation: keyset pagination on each table's unique key, in byte order.

use crate::merge::Position;

/// The one-time key table and its columns, in the order rows are read.
pub(super) const OTK_TABLE: &str = "e2e_one_time_keys_json";
/// The fallback key table.
pub(super) const FALLBACK_TABLE: &str = "e2e_fallback_keys_json";

/// The six queries of one database, built once when it is opened.
#[derive(Debug, Clone)]
pub(super) struct Queries {
    otk: [String; 3],
    fallback: [String; 3],
}

impl Queries {
    /// `placeholder(n)` writes the n-th (1-based) parameter; `collate` is
    /// appended to every compared or ordered column (empty, or ` COLLATE "C"`
    /// where the database's own order is not bytes).
    pub(super) fn new(placeholder: fn(usize) -> String, collate: &str) -> Self {
        let build = |table: &str, cols: &str, key: &[&str]| {
            let order: Vec<String> = key.iter().map(|c| format!("{c}{collate}")).collect();
            let page = |cond: &[String]| {
                let n = cond.len();
                let filter = if n == 0 {
                    String::new()
                } else {
                    let params: Vec<String> = (1..=n).map(placeholder).collect();
                    format!("WHERE ({}) > ({}) ", cond.join(", "), params.join(", "))
                };
                format!(
                    "SELECT {cols} FROM {table} {filter}ORDER BY {} LIMIT {}",
                    order.join(", "),
                    placeholder(n + 1)
                )
            };
            [page(&[]), page(&order[..2]), page(&order)]
        };
        Self {
            otk: build(
                OTK_TABLE,
                "user_id, device_id, algorithm, key_id, ts_added_ms, key_json",
                &["user_id", "device_id", "algorithm", "key_id"],
            ),
            fallback: build(
                FALLBACK_TABLE,
                "user_id, device_id, algorithm, key_id, key_json, used",
                &["user_id", "device_id", "algorithm"],
            ),
        }
    }

    /// The one-time key query for a position.
    pub(super) fn otk(&self, at: &Position) -> &str {
        &self.otk[Self::slot(at)]
    }

    /// The fallback key query for a position.
    pub(super) fn fallback(&self, at: &Position) -> &str {
        &self.fallback[Self::slot(at)]
    }

    fn slot(at: &Position) -> usize {
        match at {
            Position::Start => 0,
            Position::AfterDevice(..) => 1,
            Position::AfterOtk(..) | Position::AfterFallback(..) => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_page_on_the_unique_keys() {
        let q = Queries::new(|n| format!("${n}"), " COLLATE \"C\"");
        assert_eq!(
            q.otk(&Position::AfterDevice("u".into(), "d".into())),
            "SELECT user_id, device_id, algorithm, key_id, ts_added_ms, key_json FROM \
             e2e_one_time_keys_json WHERE (user_id COLLATE \"C\", device_id COLLATE \"C\") > \
             ($1, $2) ORDER BY user_id COLLATE \"C\", device_id COLLATE \"C\", algorithm \
             COLLATE \"C\", key_id COLLATE \"C\" LIMIT $3"
        );
        let q = Queries::new(|n| format!("?{n}"), "");
        assert_eq!(
            q.fallback(&Position::AfterFallback("u".into(), "d".into(), "a".into())),
            "SELECT user_id, device_id, algorithm, key_id, key_json, used FROM \
             e2e_fallback_keys_json WHERE (user_id, device_id, algorithm) > (?1, ?2, ?3) \
             ORDER BY user_id, device_id, algorithm LIMIT ?4"
        );
        assert!(
            q.otk(&Position::Start)
                .ends_with("ORDER BY user_id, device_id, algorithm, key_id LIMIT ?1")
        );
    }
}
