//! Operating pgstash: the admin console, metrics, the HTTP endpoint and
//! logging.

pub mod console;
pub mod http;
pub mod logging;
pub mod metrics;
