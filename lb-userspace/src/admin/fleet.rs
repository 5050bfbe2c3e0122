//! The fleet on the admin API. Reads need no token; a rolling change does.
//!
//! - `GET /v1/fleet`: this agent's view (whether it is current, how stale, every host and
//!   instance record it holds);
//! - `POST /v1/fleet/groups/{group}/params` `{"args": {...}}` (as `POST /v1/params` takes them):
//!   starts a rolling change of the group's arguments across the fleet, 202 with its id;
//! - `GET /v1/fleet/rollouts/{group}`: the group's latest rolling change and its steps (secret
//!   argument values redacted).

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRef, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{ApiError, Authorized, BODY_LIMIT};
use crate::fleet::record::{RolloutRecord, StepRecord};
use crate::fleet::rollout::RolloutError;
use crate::fleet::{FleetApi, FleetReport};
use crate::spec::AdminToken;

#[derive(Clone)]
struct FleetState {
    fleet: FleetApi,
    token: Arc<AdminToken>,
}

impl FromRef<FleetState> for Arc<AdminToken> {
    fn from_ref(state: &FleetState) -> Self {
        state.token.clone()
    }
}

pub fn router(fleet: FleetApi, token: Arc<AdminToken>) -> Router {
    Router::new()
        .route("/v1/fleet", get(report))
        .route("/v1/fleet/groups/{group}/params", post(roll))
        .route("/v1/fleet/rollouts/{group}", get(rollout))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(FleetState { fleet, token })
}

async fn report(State(state): State<FleetState>) -> Json<FleetReport> {
    Json(state.fleet.report())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollRequest {
    args: serde_json::Value,
}

#[derive(Serialize)]
struct Started {
    rollout: String,
}

async fn roll(
    State(state): State<FleetState>,
    _: Authorized,
    group: Result<Path<String>, PathRejection>,
    body: Result<Json<RollRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Path(group) = group?;
    let Json(request) = body?;
    let started = state.fleet.roll(&group, request.args).map_err(|error| {
        let status = match error {
            RolloutError::Args(_) | RolloutError::Group(_) => StatusCode::BAD_REQUEST,
            RolloutError::NoInstance(_) => StatusCode::NOT_FOUND,
        };
        ApiError::new(status, error.to_string())
    })?;
    Ok((StatusCode::ACCEPTED, Json(Started { rollout: started })).into_response())
}

#[derive(Serialize)]
struct RolloutView {
    #[serde(flatten)]
    rollout: RolloutRecord,
    steps: Vec<StepRecord>,
}

async fn rollout(
    State(state): State<FleetState>,
    group: Result<Path<String>, PathRejection>,
) -> Result<Json<RolloutView>, ApiError> {
    let Path(group) = group?;
    let (mut rollout, steps) = state.fleet.rollout(&group).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no rolling change of group `{group}` is recorded"),
        )
    })?;
    rollout.args = crate::fleet::record::redacted(&rollout.args);
    Ok(Json(RolloutView { rollout, steps }))
}
