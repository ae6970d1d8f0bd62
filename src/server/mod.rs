//! Client-facing listeners.

mod linger;
pub(crate) mod listener;
