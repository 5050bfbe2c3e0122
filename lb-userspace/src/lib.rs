//! Steer's agent.
pub mod dataplane;
pub mod policy;
