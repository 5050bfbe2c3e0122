//! `GET /v1/proxy`: the userspace proxies' counters.

use std::sync::Arc;

use crate::proxy::{Gate, ProxyStats};

/// `GET /v1/proxy`: every listening service's counters.
pub fn router(gates: Vec<Arc<Gate>>) -> axum::Router {
    let gates: Arc<[Arc<Gate>]> = gates.into();
    axum::Router::new().route(
        "/v1/proxy",
        axum::routing::get(move || {
            let stats: Vec<ProxyStats> = gates.iter().map(|gate| gate.stats()).collect();
            async move { axum::Json(stats) }
        }),
    )
}
