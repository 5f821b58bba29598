//! Per-statement-shape counters for SHOW CACHED QUERIES: hits, misses, the
//! last bypass reason and how long the upstream answer took, keyed by the
//! literal-free fingerprint and shown as literal-free text.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::sql::analyze::Reason;
use crate::sql::fingerprint::normalized;

use super::Outcome;

/// More shapes than this are not tracked (the first ones stay).
const MAX_SHAPES: usize = 2_000;

#[derive(Debug, Clone)]
pub struct ShapeStats {
    pub text: String,
    pub hits: u64,
    pub misses: u64,
    pub bypass: Option<Reason>,
    upstream_us: u64,
    upstream_count: u64,
}

impl ShapeStats {
    /// What a hit saves on average: the mean upstream time of its misses.
    pub fn saved_ms(&self) -> f64 {
        if self.upstream_count == 0 {
            0.0
        } else {
            self.upstream_us as f64 / self.upstream_count as f64 / 1000.0
        }
    }
}

#[derive(Default)]
pub struct Shapes {
    by_shape: Mutex<HashMap<u128, ShapeStats>>,
}

impl Shapes {
    pub fn record(&self, shape: u128, sql: &str, outcome: Outcome) {
        let mut map = self.by_shape.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(&shape) && map.len() >= MAX_SHAPES {
            return;
        }
        let stats = map.entry(shape).or_insert_with(|| ShapeStats {
            text: normalized(sql),
            hits: 0,
            misses: 0,
            bypass: None,
            upstream_us: 0,
            upstream_count: 0,
        });
        match outcome {
            Outcome::Hit => stats.hits += 1,
            Outcome::Miss => stats.misses += 1,
            Outcome::Bypass(reason) => stats.bypass = Some(reason),
        }
    }

    pub fn record_upstream(&self, shape: u128, elapsed: Duration) {
        let mut map = self.by_shape.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stats) = map.get_mut(&shape) {
            stats.upstream_us += elapsed.as_micros() as u64;
            stats.upstream_count += 1;
        }
    }

    /// The shapes with most hits.
    pub fn top(&self, n: usize) -> Vec<ShapeStats> {
        let map = self.by_shape.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<ShapeStats> = map.values().cloned().collect();
        all.sort_by(|a, b| b.hits.cmp(&a.hits).then(b.misses.cmp(&a.misses)));
        all.truncate(n);
        all
    }
}
