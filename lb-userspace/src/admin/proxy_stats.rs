//! `GET /v1/proxy`: the userspace proxies' counters.

use super::Live;
use crate::proxy::ProxyStats;

/// `GET /v1/proxy`: every listening service's counters (with its pools', if it has pools).
pub fn router(running: Live) -> axum::Router {
    axum::Router::new().route(
        "/v1/proxy",
        axum::routing::get(move || {
            let proxies = running.borrow().proxies.clone();
            let stats: Vec<ProxyStats> = proxies.iter().map(|proxy| proxy.stats()).collect();
            async move { axum::Json(stats) }
        }),
    )
}
