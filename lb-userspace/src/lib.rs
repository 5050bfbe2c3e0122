//! Steer's agent. SKELETON being written.
pub mod dataplane;
