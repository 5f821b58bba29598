//! The invalidation bus: a subscription to the Redis channel on which every
//! pgstash announces the generations its writes moved. Pub/sub delivers at
//! most once, so whenever the subscription (re)starts, every generation
//! held locally is re-read before the local tier is trusted again.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;

use super::generations::Generations;
use super::shared::{now_micros, parse_bump, SharedTier};

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

/// What the bus delivers: a channel name and a payload, or the end of the
/// subscription.
type Deliveries = std::pin::Pin<Box<dyn futures_util::Stream<Item = (Vec<u8>, Vec<u8>)> + Send>>;

async fn subscribe_and_follow(
    shared: &Arc<SharedTier>,
    generations: &Weak<Generations>,
) -> Result<(), String> {
    let channels = [shared.channel(), shared.fills_channel()];
    // Found before the clock starts: asking the sentinels has a timeout
    // per sentinel of its own.
    let url = if shared.config().cluster {
        None
    } else {
        Some(shared.bus_url().await.map_err(|e| e.to_string())?)
    };
    let subscribing = async {
        match url {
            None => subscribe_sharded(shared, &channels).await,
            Some(url) => subscribe_plain(&url, &channels).await,
        }
    };
    let mut deliveries = tokio::time::timeout(shared.config().connect_timeout, subscribing)
        .await
        .map_err(|_| "subscribing timed out".to_string())??;
    resync(shared, generations).await?;
    shared.heard_now();
    shared.bus_healthy.store(true, Ordering::SeqCst);
    shared.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
    let subscription = shared.presence.subscribed();
    scan_presence_in_background(shared, subscription);
    tracing::info!("invalidation bus subscribed");
    let fills_channel = channels[1].as_bytes();
    // Every instance's heartbeats arrive several times a second: silence
    // this long means a connection that died without closing, which
    // nothing else would notice.
    let silence = (shared.config().heartbeat * 20).max(Duration::from_secs(1));
    loop {
        let (channel, payload) = match tokio::time::timeout(silence, deliveries.next()).await {
            Ok(Some(delivery)) => delivery,
            Ok(None) => return Err("subscription closed".into()),
            Err(_) => return Err(format!("nothing heard on the bus for {silence:?}")),
        };
        let Some(generations) = generations.upgrade() else {
            return Ok(());
        };
        if channel == fills_channel {
            shared.on_announcement(&payload);
            continue;
        }
        let Some((database, values, sent_at)) =
            std::str::from_utf8(&payload).ok().and_then(parse_bump)
        else {
            // A heartbeat: every bump published before it has arrived.
            shared.heard_now();
            continue;
        };
        generations.observe(database, &values);
        shared.heard_now();
        shared.stats.bumps_received.fetch_add(1, Ordering::Relaxed);
        crate::admin::metrics::bus_message("received");
        crate::admin::metrics::bus_delay(Duration::from_micros(
            now_micros().saturating_sub(sent_at),
        ));
    }
}

/// SUBSCRIBE on one Redis (or the master the sentinels name).
async fn subscribe_plain(url: &str, channels: &[String]) -> Result<Deliveries, String> {
    let client = super::shared::with_no_delay(url)
        .and_then(redis::Client::open)
        .map_err(|e| e.to_string())?;
    let mut pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
    pubsub
        .subscribe(channels)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Box::pin(pubsub.into_on_message().map(|message| {
        (
            message.get_channel_name().as_bytes().to_vec(),
            message.get_payload_bytes().to_vec(),
        )
    })))
}

/// SSUBSCRIBE on a cluster: both channels share a hash slot, so one
/// master delivers them. The client library resubscribes by itself after
/// a reconnect, but messages published meanwhile are lost; so a
/// disconnection, a server-side unsubscribe (the slot moved) or any
/// subscription confirmation beyond the first ones (the library
/// resubscribed) ends the subscription, and the caller starts over with
/// a resync.
async fn subscribe_sharded(shared: &SharedTier, channels: &[String]) -> Result<Deliveries, String> {
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let client = redis::cluster::ClusterClientBuilder::new(shared.urls().to_vec())
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(sender)
        .tcp_settings(super::shared::no_delay())
        .connection_timeout(shared.config().connect_timeout)
        .response_timeout(shared.config().timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let mut connection = client
        .get_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    connection
        .ssubscribe(channels)
        .await
        .map_err(|e| e.to_string())?;
    // The library copies every confirmation to the push channel, though
    // perhaps only after `ssubscribe` has returned.
    let confirmations = channels.len();
    // The connection is carried along: dropping it ends the subscription.
    let state = (receiver, connection, confirmations);
    Ok(Box::pin(futures_util::stream::unfold(
        state,
        |(mut receiver, connection, mut confirmations)| async move {
            loop {
                let push = receiver.recv().await?;
                match push.kind {
                    redis::PushKind::SMessage => {
                        if let Some(message) = sharded_message(push) {
                            return Some((message, (receiver, connection, confirmations)));
                        }
                    }
                    redis::PushKind::SSubscribe if confirmations > 0 => confirmations -= 1,
                    redis::PushKind::SSubscribe
                    | redis::PushKind::SUnsubscribe
                    | redis::PushKind::Disconnection => return None,
                    _ => {}
                }
            }
        },
    )))
}

/// An `smessage` push as (channel, payload).
fn sharded_message(push: redis::PushInfo) -> Option<(Vec<u8>, Vec<u8>)> {
    if push.kind != redis::PushKind::SMessage {
        return None;
    }
    let mut data = push.data.into_iter();
    match (data.next(), data.next()) {
        (Some(redis::Value::BulkString(channel)), Some(redis::Value::BulkString(payload))) => {
            Some((channel, payload))
        }
        _ => None,
    }
}

/// Learns what is in Redis already, beside following the bus (whose
/// heartbeats must keep being read meanwhile).
fn scan_presence_in_background(shared: &Arc<SharedTier>, subscription: u64) {
    let shared = shared.clone();
    tokio::spawn(async move {
        if shared.scan_presence(subscription).await {
            shared.presence.scanned(subscription);
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
