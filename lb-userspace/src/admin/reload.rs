//! `POST /v1/reload`: re-read the config and apply what changed (needs the token).

use std::sync::Arc;

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};

use super::{ApiError, Authorized};
use crate::reload::{ReloadError, Report, Trigger};
use crate::spec::AdminToken;

#[derive(Clone)]
struct ReloadState {
    trigger: Trigger,
    token: Arc<AdminToken>,
}

impl FromRef<ReloadState> for Arc<AdminToken> {
    fn from_ref(state: &ReloadState) -> Self {
        state.token.clone()
    }
}

pub fn router(trigger: Trigger, token: Arc<AdminToken>) -> Router {
    Router::new()
        .route("/v1/reload", post(reload))
        .with_state(ReloadState { trigger, token })
}

/// 200 with what changed; 422 for a config that fails validation, 409 for one that needs a
/// restart (the running config stays either way), 500 for a change that failed part way.
async fn reload(State(state): State<ReloadState>, _: Authorized) -> Result<Json<Report>, ApiError> {
    state.trigger.reload().await.map(Json).map_err(|error| {
        let status = match &error {
            ReloadError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ReloadError::NeedsRestart(_) => StatusCode::CONFLICT,
            ReloadError::Apply { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ReloadError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, error.to_string())
    })
}
