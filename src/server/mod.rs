//! Client-facing listeners.

mod fast;
mod linger;
pub(crate) mod listener;
