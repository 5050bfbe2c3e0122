//! `GET /v1/proxy`: the userspace proxies' counters.

use std::sync::Arc;

use crate::proxy::{ProxyStats, ServiceProxy};

/// `GET /v1/proxy`: every listening service's counters (with its pools', if it has pools).
pub fn router(proxies: Vec<Arc<ServiceProxy>>) -> axum::Router {
    let proxies: Arc<[Arc<ServiceProxy>]> = proxies.into();
    axum::Router::new().route(
        "/v1/proxy",
        axum::routing::get(move || {
            let stats: Vec<ProxyStats> = proxies.iter().map(|proxy| proxy.stats()).collect();
            async move { axum::Json(stats) }
        }),
    )
}
