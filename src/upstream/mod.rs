//! The Postgres side: one authenticated server connection, and the pools
//! that lend them to clients.

pub mod connection;
pub mod pool;

pub use connection::{ServerConn, UpstreamError};
pub use pool::{Pool, PoolError, PoolSet, PooledConn};
