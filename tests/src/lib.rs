//! Test support. SKELETON.
