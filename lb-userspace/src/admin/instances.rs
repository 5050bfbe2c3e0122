//! `/v1/params` and `/v1/instances/{name}/params`: show and change an instance's arguments.
//! Served on its own by `steer supervise` and merged into the agent's admin API.
//!
//! A POST answers once its change is applied (200) or rejected (422, with exit status and the
//! tail of llama-server's output); with `?wait=false`, 202 at once. Bodies llama-server never
//! sees are refused with 400 (shape, types, non-flag keys, control characters, `--port` removed,
//! a path that does not resolve), 403 (a binary, flag or path the API may not set: see
//! [`crate::supervisor::policy`]) or 401 (token). Secret values are shown redacted.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRef, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{ApiError, Authorized, BODY_LIMIT, Live};
use crate::spec::AdminToken;
use crate::store::SavedArgs;
use crate::supervisor::{
    InputArgs, InstanceError, InstanceHandle, Outcome, PolicyError, Rejection, Status,
};

/// The name `/v1/params` addresses when there are several instances.
pub const DEFAULT_INSTANCE: &str = "default";

#[derive(Clone)]
struct ParamsState {
    running: Live,
    token: Arc<AdminToken>,
}

impl FromRef<ParamsState> for Arc<AdminToken> {
    fn from_ref(state: &ParamsState) -> Self {
        state.token.clone()
    }
}

/// The params routes for `instances`, without fallbacks (see [`super::router`]).
pub fn router(running: Live, token: Arc<AdminToken>) -> Router {
    let state = ParamsState { running, token };
    Router::new()
        .route("/v1/params", get(show_default).post(change_default))
        .route(
            "/v1/instances/{name}/params",
            get(show_named).post(change_named),
        )
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParamsRequest {
    args: InputArgs,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    #[serde(default = "yes")]
    wait: bool,
}

fn yes() -> bool {
    true
}

#[derive(Serialize)]
struct AppliedBody<'a> {
    applied: &'a SavedArgs,
    pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    persist_error: Option<&'a str>,
}

#[derive(Serialize)]
struct RejectedBody<'a> {
    error: String,
    exit_status: Option<&'a str>,
    output_tail: &'a [String],
    rejected: &'a SavedArgs,
    /// Whether the previous arguments are serving again.
    restored: bool,
}

#[derive(Serialize)]
struct AcceptedBody {
    accepted: bool,
}

impl ParamsState {
    /// The instance `name` (as the latest reload left them), else the only one, else the one
    /// named [`DEFAULT_INSTANCE`].
    fn instance(&self, name: Option<&str>) -> Result<InstanceHandle, ApiError> {
        let running = self.running.borrow();
        let named = |name: &str| running.instances.iter().find(|i| i.name() == name);
        let found = match name {
            Some(name) => named(name),
            None if running.instances.len() == 1 => running.instances.first(),
            None => named(DEFAULT_INSTANCE),
        }
        .cloned();
        found.ok_or_else(|| {
            let message = match name {
                Some(name) => format!("no instance named `{name}`"),
                None => format!(
                    "several instances and none named `{DEFAULT_INSTANCE}`: use /v1/instances/{{name}}/params"
                ),
            };
            ApiError::new(StatusCode::NOT_FOUND, message)
        })
    }
}

impl From<InstanceError> for ApiError {
    fn from(err: InstanceError) -> Self {
        let status = match &err {
            InstanceError::Invalid(_) | InstanceError::PortFixed { .. } => StatusCode::BAD_REQUEST,
            InstanceError::BinaryNotAllowed(_)
            | InstanceError::Denied(
                PolicyError::NotAllowed { .. } | PolicyError::OutsideModelDirs { .. },
            ) => StatusCode::FORBIDDEN,
            InstanceError::Denied(_) | InstanceError::User(_) => StatusCode::BAD_REQUEST,
            InstanceError::Stopped(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, err.to_string())
    }
}

async fn show_default(State(state): State<ParamsState>) -> Result<Json<Status>, ApiError> {
    show(&state, None).await
}

async fn show_named(
    State(state): State<ParamsState>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Status>, ApiError> {
    let Path(name) = name?;
    show(&state, Some(&name)).await
}

async fn show(state: &ParamsState, name: Option<&str>) -> Result<Json<Status>, ApiError> {
    Ok(Json(state.instance(name)?.status().await?))
}

async fn change_default(
    State(state): State<ParamsState>,
    _: Authorized,
    query: Result<Query<WaitQuery>, QueryRejection>,
    body: Result<Json<ParamsRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    change(&state, None, query, body).await
}

async fn change_named(
    State(state): State<ParamsState>,
    _: Authorized,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<WaitQuery>, QueryRejection>,
    body: Result<Json<ParamsRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name?;
    change(&state, Some(&name), query, body).await
}

async fn change(
    state: &ParamsState,
    name: Option<&str>,
    query: Result<Query<WaitQuery>, QueryRejection>,
    body: Result<Json<ParamsRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let instance = state.instance(name)?;
    let Query(WaitQuery { wait }) =
        query.map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, r.body_text()))?;
    let Json(request) = body?;
    let outcome = instance.submit(request.args).await?;
    if !wait {
        return Ok((StatusCode::ACCEPTED, Json(AcceptedBody { accepted: true })).into_response());
    }
    let outcome = outcome.await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "instance `{}` stopped before applying the change",
                instance.name()
            ),
        )
    })?;
    let outcome = outcome.redacted();
    Ok(match &outcome {
        Outcome::Applied {
            args,
            pid,
            persist_error,
        } => Json(AppliedBody {
            applied: args,
            pid: *pid,
            persist_error: persist_error.as_deref(),
        })
        .into_response(),
        Outcome::Rejected(Rejection {
            args,
            error,
            exit_status,
            output_tail,
            restored,
        }) => {
            let error = if *restored {
                format!("rejected: {error}; the previous arguments are serving again")
            } else {
                format!("rejected: {error}; the previous arguments did not come up either")
            };
            let body = RejectedBody {
                error,
                exit_status: exit_status.as_deref(),
                output_tail,
                rejected: args,
                restored: *restored,
            };
            (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The routes over `instances`, a set no reload changes.
    fn fixed_router(instances: Vec<InstanceHandle>, token: Arc<AdminToken>) -> Router {
        let running = crate::admin::Running {
            instances,
            ..Default::default()
        };
        router(running.fixed(), token)
    }
    use crate::admin::backends::tests::{TEST_TOKEN, call, call_with, test_token};
    use crate::spec::{DriverConfig, InstanceSettings};
    use crate::store::{SavedArgs, Store};
    use crate::supervisor::{Aliases, ArgPolicy, Settings, spawn};
    use axum::http::Method;
    use serde_json::{Value, json};
    use std::path::Path;
    use std::time::Duration;

    /// Start and stop within 1 s; a 60 s debounce, so a change stays queued while a test looks.
    fn settings(policy: ArgPolicy) -> Settings {
        Settings {
            instance: InstanceSettings {
                startup_timeout: Duration::from_secs(1),
                debounce: Duration::from_secs(60),
                stop_grace: Duration::from_secs(1),
                ..InstanceSettings::default()
            },
            policy,
            applies: crate::supervisor::ApplyLimit::default(),
        }
    }

    /// Routing, validation and the token need no llama-server: an instance whose binary does
    /// not exist stays down, and its API still answers.
    async fn instance(dir: &Path, name: &str) -> InstanceHandle {
        let driver = DriverConfig::File {
            path: dir.join("config.toml"),
            name: name.to_owned(),
        };
        let store = Store::open(&driver).await.unwrap_or_else(|e| panic!("{e}"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("{e}"))
            .port();
        let args = SavedArgs {
            binary: dir.join("no-such-llama-server").display().to_string(),
            args: [(
                "--port".to_owned(),
                crate::store::ArgValue::Value(port.to_string()),
            )]
            .into(),
        };
        let mut settings = settings(ArgPolicy::new(
            &[],
            &[],
            &dir.join("m.gguf").display().to_string(),
        ));
        settings.instance.allowed_binaries = vec!["/opt/llama/llama-server".to_owned()];
        spawn(name, args, Aliases::default(), settings, store, None).0
    }

    /// A directory holding the model `m.gguf`, the instances' model directory.
    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("steer-params-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.join("m.gguf"), "GGUF").unwrap_or_else(|e| panic!("{e}"));
        dir
    }

    #[tokio::test]
    async fn routes_pick_the_only_the_default_or_the_named_instance() {
        let dir = temp_dir("routes");
        let app = fixed_router(
            vec![
                instance(&dir, "a").await,
                instance(&dir, DEFAULT_INSTANCE).await,
            ],
            test_token(),
        );
        let (status, body) = call(&app, Method::GET, "/v1/params", None).await;
        assert_eq!((status, &body["name"]), (StatusCode::OK, &json!("default")));
        let (status, body) = call(&app, Method::GET, "/v1/instances/a/params", None).await;
        assert_eq!((status, &body["name"]), (StatusCode::OK, &json!("a")));
        let (status, body) = call(&app, Method::GET, "/v1/instances/zz/params", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "no instance named `zz`");

        let app = fixed_router(
            vec![instance(&dir, "a").await, instance(&dir, "b").await],
            test_token(),
        );
        let (status, body) = call(&app, Method::GET, "/v1/params", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("/v1/instances/"))
        );

        let app = fixed_router(vec![instance(&dir, "solo").await], test_token());
        let (status, body) = call(&app, Method::GET, "/v1/params", None).await;
        assert_eq!((status, &body["name"]), (StatusCode::OK, &json!("solo")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn bodies_are_checked_before_anything_changes() {
        let dir = temp_dir("bodies");
        let app = fixed_router(vec![instance(&dir, "gpt").await], test_token());
        let post = |body: String| {
            let app = app.clone();
            async move { call(&app, Method::POST, "/v1/params", Some(&body)).await }
        };
        for (body, expected) in [
            (r#"{"args": {"-c": 1"#, "EOF"),
            (r#"{"args": {}, "more": 1}"#, "unknown field `more`"),
            (r#"{"args": {"model": "x"}}"#, "`model` is not a flag name"),
            (r#"{"args": {"--mlock": false}}"#, "`false` is not a value"),
            (r#"{"args": {"-c": {"n": 1}}}"#, "a string, a number, true"),
            (r#"{"args": {"--port": null}}"#, "--port cannot be removed"),
        ] {
            let (status, answer) = post(body.to_owned()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
            let error = answer["error"].as_str().unwrap_or_default();
            assert!(error.contains(expected), "{body}: {error}");
        }
        let (status, answer) = post(r#"{"args": {"binary": "/bin/sh"}}"#.to_owned()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
        let huge = format!(r#"{{"args": {{"-m": "{}"}}}}"#, "x".repeat(BODY_LIMIT));
        assert_eq!(post(huge).await.0, StatusCode::PAYLOAD_TOO_LARGE);
        let (status, answer) = call(&app, Method::GET, "/v1/params", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer["pending"], Value::Null, "nothing was queued");

        // Accepted without waiting; the debounce window (60 s here) holds it as pending.
        let model = dir.join("m.gguf");
        let change = json!({"args": {"--model": model, "--mlock": true, "--ctx-size": 8192}});
        let (status, answer) = call(
            &app,
            Method::POST,
            "/v1/params?wait=false",
            Some(&change.to_string()),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        let (_, answer) = call(&app, Method::GET, "/v1/params", None).await;
        let model = std::fs::canonicalize(&model).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            answer["pending"],
            json!({"--model": model, "--mlock": true, "--ctx-size": "8192"})
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn changes_need_the_token_when_one_is_set() {
        let dir = temp_dir("token");
        let app = fixed_router(vec![instance(&dir, "gpt").await], test_token());
        let change = Some(r#"{"args": {"--ctx-size": 1}}"#);
        let uri = "/v1/params?wait=false";
        let (status, _) = call_with(&app, Method::GET, "/v1/params", None, None).await;
        assert_eq!(status, StatusCode::OK, "reads need no token");
        let (status, _) = call_with(&app, Method::POST, uri, change, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let named = "/v1/instances/gpt/params?wait=false";
        let (status, _) = call_with(&app, Method::POST, named, change, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = call_with(&app, Method::POST, uri, change, Some("nope")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = call_with(&app, Method::POST, uri, change, Some(TEST_TOKEN)).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Flags that would reach the host (files, listening address) are refused with 403 naming
    /// the flag, before anything is queued; so are paths outside the model directory.
    #[tokio::test]
    async fn flags_outside_the_allowlist_are_forbidden() {
        let dir = temp_dir("policy");
        let app = fixed_router(vec![instance(&dir, "gpt").await], test_token());
        for (flag, value) in [
            ("--path", json!("/etc")),
            ("--log-file", json!("/tmp/steer-owned")),
            ("--host", json!("0.0.0.0")),
            ("--slot-save-path", json!("/")),
            ("--api-key-file", json!("/etc/shadow")),
            ("--ssl-key-file", json!("/etc/shadow")),
            ("--model", json!("/etc/shadow")),
            ("--chat-template-file", json!(dir.join("../../etc/passwd"))),
        ] {
            let body = json!({"args": {flag: value}}).to_string();
            let (status, answer) = call(&app, Method::POST, "/v1/params", Some(&body)).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{body}: {answer}");
            let error = answer["error"].as_str().unwrap_or_default();
            assert!(error.starts_with(flag), "{body}: {error}");
        }
        let (_, answer) = call(&app, Method::GET, "/v1/params", None).await;
        assert_eq!(answer["pending"], Value::Null, "nothing was queued");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A NUL (or any control character) cannot be in an argv: 400 naming the flag, nothing
    /// queued. Integers past 2^53 reach the arguments as written.
    #[tokio::test]
    async fn values_are_validated_and_kept_exact() {
        let dir = temp_dir("values");
        let app = fixed_router(vec![instance(&dir, "gpt").await], test_token());
        for body in [
            r#"{"args": {"--alias": "a\u0000b"}}"#,
            r#"{"args": {"--alias": "a\u001b[31m"}}"#,
            r#"{"args": {"binary": "/opt/llama/llama-server\u0000"}}"#,
        ] {
            let (status, answer) = call(&app, Method::POST, "/v1/params", Some(body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
            let error = answer["error"].as_str().unwrap_or_default();
            assert!(error.contains("control character"), "{body}: {error}");
        }
        let (_, answer) = call(&app, Method::GET, "/v1/params", None).await;
        assert_eq!(answer["pending"], Value::Null, "nothing was queued");

        let big = r#"{"args": {"--seed": 9007199254740993, "--keep": -18446744073709551617,
            "--temp": 0.5, "--top-p": 1e-1, "--alias": "a\tb"}}"#;
        let (status, answer) = call(&app, Method::POST, "/v1/params?wait=false", Some(big)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        let (_, answer) = call(&app, Method::GET, "/v1/params", None).await;
        assert_eq!(
            answer["pending"],
            json!({"--seed": "9007199254740993", "--keep": "-18446744073709551617",
                "--temp": "0.5", "--top-p": "0.1", "--alias": "a\tb"})
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Every extractor's rejection is the one JSON error shape: a name that is not UTF-8, a bad
    /// query, a body of the wrong type.
    #[tokio::test]
    async fn bad_names_and_queries_get_json_errors() {
        let dir = temp_dir("names");
        let app = fixed_router(vec![instance(&dir, "gpt").await], test_token());
        let app = super::super::with_fallbacks(app);
        for (method, uri, body) in [
            (Method::GET, "/v1/instances/%FF%FE/params", None),
            (
                Method::POST,
                "/v1/instances/%C3%28/params",
                Some(r#"{"args": {}}"#),
            ),
            (
                Method::POST,
                "/v1/params?wait=maybe",
                Some(r#"{"args": {}}"#),
            ),
            (Method::POST, "/v1/params", Some(r#"{"args": []}"#)),
        ] {
            let (status, answer) = call(&app, method.clone(), uri, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {uri}: {answer}");
            assert!(answer["error"].is_string(), "{method} {uri}: {answer}");
        }
        let (status, answer) = call(&app, Method::GET, "/v1/instances/a%2Fb/params", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
        assert_eq!(answer["error"], "no instance named `a/b`");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `--api-key` reaches llama-server and the store, but no view shows it.
    #[tokio::test]
    async fn secrets_are_redacted_in_every_view() {
        let dir = temp_dir("redact");
        let driver = DriverConfig::File {
            path: dir.join("config.toml"),
            name: "gpt".to_owned(),
        };
        let store = Store::open(&driver).await.unwrap_or_else(|e| panic!("{e}"));
        let args = SavedArgs {
            binary: dir.join("no-such-llama-server").display().to_string(),
            args: [
                ("--port", "1"),
                ("--api-key", "s3cret-key"),
                ("--hf-token", "s3cret-hf"),
            ]
            .map(|(f, v)| (f.to_owned(), crate::store::ArgValue::Value(v.to_owned())))
            .into(),
        };
        let settings = settings(ArgPolicy::new(&["--api-key".to_owned()], &[], "m.gguf"));
        let (handle, _task) = spawn("gpt", args, Aliases::default(), settings, store, None);
        let app = fixed_router(vec![handle], test_token());
        let change = r#"{"args": {"--api-key": "n3w-key"}}"#;
        let (status, _) = call(&app, Method::POST, "/v1/params?wait=false", Some(change)).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let (status, answer) = call(&app, Method::GET, "/v1/params", None).await;
        assert_eq!(status, StatusCode::OK);
        let text = answer.to_string();
        for secret in ["s3cret-key", "s3cret-hf", "n3w-key"] {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
        assert_eq!(answer["applied"]["args"]["--api-key"], "<redacted>");
        assert_eq!(answer["applied"]["args"]["--hf-token"], "<redacted>");
        // The change is pending, or (the start having failed already) its outcome is shown.
        let changed = [
            &answer["pending"]["--api-key"],
            &answer["last_outcome"]["args"]["args"]["--api-key"],
        ];
        assert!(changed.contains(&&json!("<redacted>")), "{answer}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
