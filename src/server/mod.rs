//! Client-facing listeners.

mod linger;
pub(crate) mod listener;
pub(crate) mod tls;
