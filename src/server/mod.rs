//! Client-facing listeners.

pub(crate) mod listener;
