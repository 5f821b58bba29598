//! The wire: splitting byte streams into frames, the few typed views the
//! proxy needs, and the messages pgstash writes itself.

pub mod frame;
pub mod messages;
pub mod outbox;
pub mod startup;

pub use frame::{Frame, FrameError};
pub use outbox::Outbox;
