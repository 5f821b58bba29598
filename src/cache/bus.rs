//! The invalidation bus: a subscription to the Redis channel on which every
//! pgstash announces the generations its writes moved. Pub/sub delivers at
//! most once, so whenever the subscription (re)starts, every generation
//! held locally is re-read before the local tier is trusted again.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;

use super::generations::Generations;
use super::shared::{parse_bump, SharedTier};

/// Keeps the subscription up for as long as the cache exists, and
/// announces this instance on it so a stalled subscription is noticed.
pub fn spawn(shared: Arc<SharedTier>, generations: Weak<Generations>) {
    let beating = shared.clone();
    let alive = generations.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(beating.config().heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while alive.upgrade().is_some() {
            tick.tick().await;
            let _ = beating.heartbeat().await;
        }
    });
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(50);
        loop {
            if generations.upgrade().is_none() {
                return;
            }
            match subscribe_and_follow(&shared, &generations).await {
                Ok(()) => backoff = Duration::from_millis(50),
                Err(e) => {
                    tracing::warn!(error = %e, "invalidation bus lost; local tier not trusted until it is back")
                }
            }
            shared.bus_healthy.store(false, Ordering::SeqCst);
            shared.presence.lost();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    });
}

async fn subscribe_and_follow(
    shared: &Arc<SharedTier>,
    generations: &Weak<Generations>,
) -> Result<(), String> {
    let url = shared.bus_url().await.map_err(|e| e.to_string())?;
    let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
    let mut pubsub =
        tokio::time::timeout(shared.config().connect_timeout, client.get_async_pubsub())
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
    pubsub
        .subscribe(&[shared.channel(), shared.fills_channel()])
        .await
        .map_err(|e| e.to_string())?;
    resync(shared, generations).await?;
    shared.heard_now();
    shared.bus_healthy.store(true, Ordering::SeqCst);
    let subscription = shared.presence.subscribed();
    scan_presence_in_background(shared, subscription);
    let fills_channel = shared.fills_channel();
    tracing::info!("invalidation bus subscribed");
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let Some(generations) = generations.upgrade() else {
            return Ok(());
        };
        if message.get_channel_name() == fills_channel {
            shared.on_announcement(message.get_payload_bytes());
            continue;
        }
        let Ok(text) = message.get_payload::<String>() else {
            shared.heard_now();
            continue;
        };
        let Some((database, values, sent_at)) = parse_bump(&text) else {
            // A heartbeat: every bump published before it has arrived.
            shared.heard_now();
            continue;
        };
        generations.observe(database, &values);
        shared.heard_now();
        shared.stats.bumps_received.fetch_add(1, Ordering::Relaxed);
        crate::admin::metrics::bus_message("received");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        crate::admin::metrics::bus_delay(Duration::from_micros(now.saturating_sub(sent_at) as u64));
    }
    Err("subscription closed".into())
}

/// Learns what is in Redis already, beside following the bus (whose
/// heartbeats must keep being read meanwhile).
fn scan_presence_in_background(shared: &Arc<SharedTier>, subscription: u64) {
    let shared = shared.clone();
    tokio::spawn(async move {
        match shared.scan_presence().await {
            Ok(true) => shared.presence.scanned(subscription),
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "scanning redis for stored entries failed"),
        }
    });
}

/// Re-reads every generation held locally from Redis.
async fn resync(shared: &SharedTier, generations: &Weak<Generations>) -> Result<(), String> {
    let Some(generations) = generations.upgrade() else {
        return Ok(());
    };
    let mut by_database: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (database, table) in generations.held() {
        by_database.entry(database).or_default().push(table);
    }
    for (database, tables) in by_database {
        for chunk in tables.chunks(500) {
            let values = shared
                .generations(database, chunk)
                .await
                .map_err(|e| e.to_string())?;
            let pairs: Vec<(u32, u64)> = chunk.iter().copied().zip(values).collect();
            generations.observe(database, &pairs);
        }
    }
    Ok(())
}
