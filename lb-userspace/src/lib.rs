//! Steer's agent.
pub mod api;
pub mod config;
pub mod dataplane;
pub mod policy;
pub mod table;

#[cfg(test)]
mod fake;
