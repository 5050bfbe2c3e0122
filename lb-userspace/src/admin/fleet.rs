//! `GET /v1/fleet`: this agent's view of the fleet (whether it is current, how stale, every
//! host and instance record it holds). Reads need no token.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use crate::fleet::{FleetReport, FleetStatus};

pub fn router(status: Arc<FleetStatus>) -> Router {
    Router::new()
        .route("/v1/fleet", get(report))
        .with_state(status)
}

async fn report(State(status): State<Arc<FleetStatus>>) -> Json<FleetReport> {
    Json(status.report())
}
