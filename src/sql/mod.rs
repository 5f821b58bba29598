//! What pgstash needs to know about SQL text.

pub mod effects;

pub use effects::{session_effects, SessionEffects};
pub mod analyze;
pub mod fingerprint;
