//! Logging setup with a level that RELOAD can change.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

static HANDLE: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber: text or JSON lines on stderr.
pub fn init(level: &str, json: bool) {
    let (filter, handle) = reload::Layer::new(EnvFilter::new(level));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if json {
        registry.with(fmt.json()).try_init()
    } else {
        registry.with(fmt).try_init()
    };
    if installed.is_ok() {
        let _ = HANDLE.set(handle);
    }
}

/// Applies a new level filter, if logging was set up here.
pub fn set_level(level: &str) {
    if let Some(handle) = HANDLE.get() {
        if let Err(e) = handle.reload(EnvFilter::new(level)) {
            tracing::warn!(error = %e, "cannot change the log level");
        }
    }
}
