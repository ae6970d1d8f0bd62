//! Client-facing listeners.

pub(crate) mod fast;
mod linger;
pub(crate) mod listener;
