//! `/v1/backends` and `/v1/services`: list backends and services, add, remove, drain and
//! activate backends. Handlers only translate: every change is a call on the [`TableHandle`].
//!
//! Errors are `{"error": "..."}` with 400 (bad request body or id), 401 (token), 404 (unknown
//! backend, service or route), 409 (duplicate address, full service, removing a supervised
//! instance's backend) and 5xx (data plane).

use std::net::SocketAddrV4;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRef, Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{ApiError, Authorized, BODY_LIMIT};
use crate::spec::{AdminToken, Weight, usable_endpoint};
use crate::table::{BackendInfo, NewBackend, ServiceInfo, TableError, TableHandle};

#[derive(Clone)]
struct ApiState {
    table: TableHandle,
    token: Arc<AdminToken>,
}

/// The admin API's routes. Mutating calls need `Authorization: Bearer <token>`; reads are open.
pub fn router(table: TableHandle, token: Arc<AdminToken>) -> Router {
    let state = ApiState { table, token };
    Router::new()
        .route("/v1/backends", get(list_backends).post(add_backend))
        .route("/v1/backends/{id}", delete(remove_backend))
        .route("/v1/backends/{id}/drain", post(drain_backend))
        .route("/v1/backends/{id}/activate", post(activate_backend))
        .route("/v1/services", get(list_services))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

impl From<TableError> for ApiError {
    fn from(err: TableError) -> Self {
        let status = match &err {
            TableError::UnknownService(_) | TableError::UnknownBackend(_) => StatusCode::NOT_FOUND,
            TableError::LoopbackSteered { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            TableError::DuplicateAddress { .. }
            | TableError::ServiceFull { .. }
            | TableError::Supervised { .. } => StatusCode::CONFLICT,
            TableError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            TableError::TooManyServices { .. } | TableError::Dataplane(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, err.to_string())
    }
}

impl FromRef<ApiState> for Arc<AdminToken> {
    fn from_ref(state: &ApiState) -> Self {
        state.token.clone()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBackendRequest {
    service: String,
    address: SocketAddrV4,
    #[serde(default)]
    weight: Weight,
    #[serde(default)]
    max_connections: u32,
    #[serde(default)]
    models: Vec<String>,
}

#[derive(Serialize)]
struct BackendList {
    backends: Vec<BackendInfo>,
}

#[derive(Serialize)]
struct ServiceList {
    services: Vec<ServiceInfo>,
}

// Listings read the counters now: a caller compares them with the traffic it just sent.
async fn list_backends(State(state): State<ApiState>) -> Result<Json<BackendList>, ApiError> {
    let snapshot = state.table.fresh_snapshot().await?;
    Ok(Json(BackendList {
        backends: snapshot.backends.clone(),
    }))
}

async fn list_services(State(state): State<ApiState>) -> Result<Json<ServiceList>, ApiError> {
    let snapshot = state.table.fresh_snapshot().await?;
    Ok(Json(ServiceList {
        services: snapshot.services.clone(),
    }))
}

async fn add_backend(
    State(state): State<ApiState>,
    _: Authorized,
    body: Result<Json<AddBackendRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<BackendInfo>), ApiError> {
    let Json(request) = body?;
    if !usable_endpoint(request.address) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{} is not a usable address and port", request.address),
        ));
    }
    let backend = NewBackend {
        service: request.service,
        address: request.address,
        weight: request.weight,
        max_connections: request.max_connections,
        models: request.models,
        instance: None,
    };
    let info = state.table.add_backend(backend).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn remove_backend(
    State(state): State<ApiState>,
    _: Authorized,
    id: Result<Path<u32>, PathRejection>,
) -> Result<Json<BackendInfo>, ApiError> {
    let Path(id) = id?;
    Ok(Json(state.table.remove_backend(id).await?))
}

async fn drain_backend(
    State(state): State<ApiState>,
    _: Authorized,
    id: Result<Path<u32>, PathRejection>,
) -> Result<Json<BackendInfo>, ApiError> {
    let Path(id) = id?;
    Ok(Json(state.table.drain_backend(id).await?))
}

async fn activate_backend(
    State(state): State<ApiState>,
    _: Authorized,
    id: Result<Path<u32>, PathRejection>,
) -> Result<Json<BackendInfo>, ApiError> {
    let Path(id) = id?;
    Ok(Json(state.table.activate_backend(id).await?))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::admin::with_fallbacks;
    use crate::fake::FakeDataplane;
    use crate::spec::{BackendSpec, ServiceSpec};
    use crate::table;
    use axum::body::Body;
    use axum::http::header;
    use axum::http::{Method, Request};
    use serde_json::{Value, json};
    use tower::ServiceExt;

    fn services() -> Vec<ServiceSpec> {
        let backend = BackendSpec {
            address: SocketAddrV4::new([10, 0, 1, 2].into(), 8080),
            weight: Weight::ONE,
            max_connections: 0,
            models: Vec::new(),
        };
        vec![crate::fake::chat_service(vec![backend], None)]
    }

    fn app() -> Router {
        let (handle, _task) = table::start(FakeDataplane::default(), &services())
            .unwrap_or_else(|e| panic!("starting the table: {e}"));
        with_fallbacks(router(handle, test_token()))
    }

    /// The token the unit tests' routers check.
    pub(crate) const TEST_TOKEN: &str = "t0ken";

    pub(crate) fn test_token() -> Arc<AdminToken> {
        Arc::new(AdminToken::from_text(TEST_TOKEN).unwrap_or_else(|| panic!("a token")))
    }

    /// A call carrying [`TEST_TOKEN`].
    pub(crate) async fn call(
        app: &Router,
        method: Method,
        uri: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        call_with(app, method, uri, body, Some(TEST_TOKEN)).await
    }

    pub(crate) async fn call_with(
        app: &Router,
        method: Method,
        uri: &str,
        body: Option<&str>,
        bearer: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(uri);
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(bearer) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {bearer}"));
        }
        let request = request
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap_or_else(|e| panic!("{e}"));
        let response = app
            .clone()
            .oneshot(request)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {bytes:?}"));
        (status, value)
    }

    #[tokio::test]
    async fn list_add_drain_activate_remove() {
        let app = app();
        let (status, body) = call(&app, Method::GET, "/v1/backends", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"backends": [{"id": 0, "service": "chat", "address": "10.0.1.2:8080",
                "weight": 1, "max_connections": 0, "state": "active", "kind": "remote",
                "status": "healthy", "healthy": true, "health": {"checks": "unchecked"}, "active_connections": 0, "packets": 0, "bytes": 0, "new_flows": 0,
                "steered_since_poll": 0, "models": [],
                "requests": {"in_flight": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0,
                    "unreachable": 0, "failed": 0},
                "tokens": {"prompt": 0, "generated": 0},
                "speed": {"decode_tokens_per_second": null, "prompt_tokens_per_second": null,
                    "generated_tokens_per_answer": null,
                    "models": {}}}]})
        );

        let add = r#"{"service":"chat","address":"10.0.1.3:8080","weight":2,"max_connections":4,
            "models":["qwen"]}"#;
        let (status, body) = call(&app, Method::POST, "/v1/backends", Some(add)).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(
            (
                &body["id"],
                &body["weight"],
                &body["max_connections"],
                &body["state"],
                &body["models"],
                &body["status"]
            ),
            (
                &json!(1),
                &json!(2),
                &json!(4),
                &json!("active"),
                &json!(["qwen"]),
                &json!("healthy")
            ),
            "no health checks: healthy at once"
        );

        let (status, body) = call(&app, Method::POST, "/v1/backends/1/drain", None).await;
        assert_eq!(
            (status, &body["state"], &body["status"]),
            (StatusCode::OK, &json!("draining"), &json!("draining"))
        );
        let (status, body) = call(&app, Method::POST, "/v1/backends/1/activate", None).await;
        assert_eq!((status, &body["state"]), (StatusCode::OK, &json!("active")));
        let (status, body) = call(&app, Method::DELETE, "/v1/backends/1", None).await;
        assert_eq!(
            (status, &body["address"]),
            (StatusCode::OK, &json!("10.0.1.3:8080"))
        );
        let (_, body) = call(&app, Method::GET, "/v1/backends", None).await;
        assert_eq!(body["backends"].as_array().map(Vec::len), Some(1));

        let minimal = r#"{"service":"chat","address":"10.0.1.4:8080"}"#;
        let (status, body) = call(&app, Method::POST, "/v1/backends", Some(minimal)).await;
        assert_eq!(
            (status, &body["id"], &body["weight"]),
            (StatusCode::CREATED, &json!(1), &json!(1))
        );
    }

    #[tokio::test]
    async fn services_with_counters() {
        let (status, body) = call(&app(), Method::GET, "/v1/services", None).await;
        assert_eq!(status, StatusCode::OK);
        let service = &body["services"][0];
        assert_eq!(service["name"], "chat");
        assert_eq!(service["address"], "10.0.0.100:80");
        assert_eq!(service["policy"], "round_robin");
        for counter in [
            "new_flows",
            "no_backend",
            "no_route",
            "no_snat_port",
            "no_flow",
            "closed_flows",
            "fwd_packets",
            "fwd_bytes",
            "reply_packets",
            "reply_bytes",
        ] {
            assert_eq!(service[counter], 0, "{counter}");
        }
    }

    #[tokio::test]
    async fn error_statuses_and_messages() {
        let app = app();
        let post = |body: &'static str| {
            let app = app.clone();
            async move { call(&app, Method::POST, "/v1/backends", Some(body)).await }
        };
        let (status, body) = post(r#"{"service":"chat","address":"10.0.1.2:8080"}"#).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(
            body["error"],
            "service `chat` already has a backend at 10.0.1.2:8080"
        );
        let (status, body) = post(r#"{"service":"nope","address":"10.0.1.9:8080"}"#).await;
        assert_eq!(
            (status, &body["error"]),
            (StatusCode::NOT_FOUND, &json!("no service named `nope`"))
        );
        let (status, body) = post(r#"{"service":"chat","address":"10.0.1.9:8080","x":1}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("unknown field `x`")),
            "{body}"
        );
        let (status, body) =
            post(r#"{"service":"chat","address":"10.0.1.9:8080","weight":"3"}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let (status, body) =
            post(r#"{"service":"chat","address":"10.0.1.9:8080","weight":0}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("weight must be between 1 and 65535")),
            "{body}"
        );
        let (status, _) = post(r#"{"service":"chat","address":"10.0.1.9"}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = post(r#"{"service":"chat","#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, body) = post(r#"{"service":"chat","address":"10.0.1.9:0"}"#).await;
        assert_eq!(
            (status, &body["error"]),
            (
                StatusCode::BAD_REQUEST,
                &json!("10.0.1.9:0 is not a usable address and port")
            )
        );

        let (status, body) = call(&app, Method::DELETE, "/v1/backends/7", None).await;
        assert_eq!(
            (status, &body["error"]),
            (StatusCode::NOT_FOUND, &json!("no backend with id 7"))
        );
        let (status, _) = call(&app, Method::POST, "/v1/backends/99999/drain", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = call(&app, Method::POST, "/v1/backends/abc/drain", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = call(&app, Method::GET, "/v2/nothing", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = call(&app, Method::PUT, "/v1/backends", None).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

        let huge = format!(
            r#"{{"service":"{}","address":"10.0.1.9:8080"}}"#,
            "x".repeat(BODY_LIMIT)
        );
        let (status, _) = call(&app, Method::POST, "/v1/backends", Some(&huge)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn full_service_is_a_conflict() {
        let app = app();
        for i in 1..lb_common::MAX_BACKENDS_PER_SERVICE {
            let body = format!(r#"{{"service":"chat","address":"10.0.2.{i}:80"}}"#);
            let (status, _) = call(&app, Method::POST, "/v1/backends", Some(&body)).await;
            assert_eq!(status, StatusCode::CREATED);
        }
        let body = r#"{"service":"chat","address":"10.0.3.1:80"}"#;
        let (status, _) = call(&app, Method::POST, "/v1/backends", Some(body)).await;
        assert_eq!(status, StatusCode::CONFLICT);
    }

    /// Issue 11 finding 6: a supervised instance's backend cannot be deleted (409 naming the
    /// instance), so its id never goes to another backend; the listing shows both health
    /// inputs.
    #[tokio::test]
    async fn an_instance_backend_is_not_deleted() {
        let (handle, _task) = table::start(FakeDataplane::default(), &services())
            .unwrap_or_else(|e| panic!("starting the table: {e}"));
        let gpt = handle
            .add_backend(NewBackend {
                service: "chat".to_owned(),
                address: SocketAddrV4::new([10, 0, 1, 5].into(), 8080),
                weight: Weight::ONE,
                max_connections: 0,
                models: Vec::new(),
                instance: Some("gpt".to_owned()),
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let app = with_fallbacks(router(handle, test_token()));
        let bearer = Some("t0ken");
        let uri = format!("/v1/backends/{}", gpt.id);
        let (status, body) = call_with(&app, Method::DELETE, &uri, None, bearer).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains("instance `gpt`"), "{body}");

        let add = r#"{"service":"chat","address":"10.0.1.9:8080"}"#;
        let (status, added) =
            call_with(&app, Method::POST, "/v1/backends", Some(add), bearer).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_ne!(
            added["id"],
            json!(gpt.id),
            "the instance's id is not given away"
        );

        let (_, list) = call(&app, Method::GET, "/v1/backends", None).await;
        let listed = list["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["id"] == json!(gpt.id)).cloned())
            .unwrap_or_else(|| panic!("still listed: {list}"));
        assert_eq!(listed["instance"], "gpt");
        assert_eq!(
            (&listed["status"], &listed["healthy"]),
            (&json!("unknown"), &json!(false)),
            "not before its process is up"
        );
        assert_eq!(
            listed["health"],
            json!({"process": "down", "checks": "unchecked"})
        );
    }

    #[tokio::test]
    async fn token_guards_mutating_calls() {
        let app = app();
        let (status, _) = call_with(&app, Method::GET, "/v1/backends", None, None).await;
        assert_eq!(status, StatusCode::OK, "reads need no token");
        let (status, body) =
            call_with(&app, Method::POST, "/v1/backends/0/drain", None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("Authorization"))
        );
        let drain = |bearer| {
            call_with(
                &app,
                Method::POST,
                "/v1/backends/0/drain",
                None,
                Some(bearer),
            )
        };
        assert_eq!(drain("wrong").await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(drain(TEST_TOKEN).await.0, StatusCode::OK);
        let (status, _) = call_with(&app, Method::POST, "/v1/backends", Some("{}"), None).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "the token is checked before the body"
        );
    }
}
