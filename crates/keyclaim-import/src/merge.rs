//! The two key tables read page by page and merged into one stream of rows
//! in (user ID, device ID) byte order, the order
//! [`keyclaim::transfer::import_devices`] reads.

use std::collections::VecDeque;

use async_trait::async_trait;
use keyclaim::Result;
use keyclaim::transfer::{RowSource, SourceRow};

/// Where the next page of a table starts: keyset pagination on the table's
/// unique key, so that each page is one index range read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Position {
    /// At the first row.
    Start,
    /// After every row of this (user ID, device ID).
    AfterDevice(String, String),
    /// After this (user ID, device ID, algorithm, key name) of the one-time
    /// key table.
    AfterOtk(String, String, String, String),
    /// After this (user ID, device ID, algorithm) of the fallback key table.
    AfterFallback(String, String, String),
}

impl Position {
    /// The position after a row.
    fn after(row: &SourceRow) -> Self {
        match row {
            SourceRow::OneTimeKey(k) => Self::AfterOtk(
                k.user_id.clone(),
                k.device_id.clone(),
                k.algorithm.clone(),
                k.key_id.clone(),
            ),
            SourceRow::Fallback(k) => {
                Self::AfterFallback(k.user_id.clone(), k.device_id.clone(), k.algorithm.clone())
            }
        }
    }

    /// The values the position binds, in order.
    pub(crate) fn values(&self) -> Vec<&str> {
        match self {
            Self::Start => vec![],
            Self::AfterDevice(u, d) => vec![u, d],
            Self::AfterOtk(u, d, a, k) => vec![u, d, a, k],
            Self::AfterFallback(u, d, a) => vec![u, d, a],
        }
    }
}

/// A database holding the reference homeserver's two key tables.
#[async_trait]
pub(crate) trait KeyTables: Send + Sync {
    /// Up to `limit` rows of `e2e_one_time_keys_json` after `at`, in
    /// (user ID, device ID, algorithm, key name) byte order.
    async fn one_time_keys(&self, at: &Position, limit: usize) -> Result<Vec<SourceRow>>;

    /// Up to `limit` rows of `e2e_fallback_keys_json` after `at`, in
    /// (user ID, device ID, algorithm) byte order.
    async fn fallback_keys(&self, at: &Position, limit: usize) -> Result<Vec<SourceRow>>;
}

/// One table's read position and its current page.
#[derive(Debug)]
struct Cursor {
    rows: VecDeque<SourceRow>,
    at: Position,
    done: bool,
}

impl Cursor {
    fn new(at: Position) -> Self {
        Self {
            rows: VecDeque::new(),
            at,
            done: false,
        }
    }

    fn took(&mut self, page: Vec<SourceRow>, limit: usize) {
        if page.len() < limit {
            self.done = true;
        }
        if let Some(last) = page.last() {
            self.at = Position::after(last);
        }
        self.rows.extend(page);
    }
}

/// Both tables merged by device, `page` rows at a time: memory holds at
/// most a page of each table and a page of output.
pub(crate) struct Merged<'a, T: KeyTables + ?Sized> {
    tables: &'a T,
    otks: Cursor,
    fallbacks: Cursor,
    page: usize,
}

impl<'a, T: KeyTables + ?Sized> Merged<'a, T> {
    /// Reads every row after `at` (`Start`, or `AfterDevice` to resume).
    pub(crate) fn new(tables: &'a T, at: Position, page: usize) -> Self {
        Self {
            tables,
            otks: Cursor::new(at.clone()),
            fallbacks: Cursor::new(at),
            page: page.max(1),
        }
    }
}

fn device(row: &SourceRow) -> (&str, &str) {
    (row.user_id(), row.device_id())
}

#[async_trait]
impl<T: KeyTables + ?Sized> RowSource for Merged<'_, T> {
    async fn next_rows(&mut self) -> Result<Vec<SourceRow>> {
        let mut out = Vec::new();
        while out.len() < self.page {
            if self.otks.rows.is_empty() && !self.otks.done {
                let page = self.tables.one_time_keys(&self.otks.at, self.page).await?;
                self.otks.took(page, self.page);
            }
            if self.fallbacks.rows.is_empty() && !self.fallbacks.done {
                let page = self
                    .tables
                    .fallback_keys(&self.fallbacks.at, self.page)
                    .await?;
                self.fallbacks.took(page, self.page);
            }
            let from_otks = match (self.otks.rows.front(), self.fallbacks.rows.front()) {
                (None, None) => break,
                (Some(a), Some(b)) => device(a) <= device(b),
                (Some(_), None) => true,
                (None, Some(_)) => false,
            };
            let next = if from_otks {
                self.otks.rows.pop_front()
            } else {
                self.fallbacks.rows.pop_front()
            };
            out.extend(next);
        }
        Ok(out)
    }
}
