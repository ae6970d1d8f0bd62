//! Client-facing listeners.

pub(crate) mod listener;
pub(crate) mod tls;
