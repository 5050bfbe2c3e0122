//! Reload: SIGHUP, `steer reload` and `POST /v1/reload` ask the running agent to re-read its
//! config and apply only what changed. A [`Trigger`] sends the ask to the agent's loop, which
//! reads the file, refuses a config that fails validation or changes what only a restart can
//! (the error says which), and otherwise applies the [`Plan`] between the specs it runs and the
//! new ones: services changed in place through the table and a replaced proxy, instances added,
//! removed or restarted with their new settings. Nothing the plan does not name is touched.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::spec::{InstanceSpec, ServiceSpec};

/// What a reload did, for the log, the API's answer and `steer reload`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Services whose settings or backends changed, in config order.
    pub services: Vec<String>,
    pub instances_added: Vec<String>,
    pub instances_removed: Vec<String>,
    /// Restarted with their new settings.
    pub instances_changed: Vec<String>,
    /// `agent.shutdown_timeout`.
    pub shutdown_timeout: bool,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        *self == Report::default()
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be read or fails validation: the running config stays.
    #[error("the config is refused, the running one stays: {0}")]
    Invalid(String),
    /// It changes something a running agent cannot change: the running config stays.
    #[error("the config changes {0}, which needs a restart; the running config stays")]
    NeedsRestart(String),
    /// A change failed part way: what `applied` names is in effect, the rest is as it was.
    #[error("applying the config: {error}; applied before it: {applied:?}")]
    Apply { error: String, applied: Box<Report> },
    #[error("the agent is stopping")]
    Stopping,
}

/// One ask, answered when the reload is done.
#[derive(Debug)]
pub struct Request {
    pub reply: oneshot::Sender<Result<Report, ReloadError>>,
}

/// A cheap handle that asks the agent's loop to reload.
#[derive(Clone, Debug)]
pub struct Trigger(mpsc::Sender<Request>);

/// Asks queued behind the reload that runs; a caller past them waits for room.
const PENDING: usize = 4;

/// The trigger, and what the agent's loop receives.
pub fn channel() -> (Trigger, mpsc::Receiver<Request>) {
    let (tx, rx) = mpsc::channel(PENDING);
    (Trigger(tx), rx)
}

impl Trigger {
    /// Asks for a reload and waits for its outcome.
    pub async fn reload(&self) -> Result<Report, ReloadError> {
        let (reply, outcome) = oneshot::channel();
        self.0
            .send(Request { reply })
            .await
            .map_err(|_| ReloadError::Stopping)?;
        outcome.await.map_err(|_| ReloadError::Stopping)?
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("POST /v1/reload to {admin}: {source}")]
    Io {
        admin: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("POST /v1/reload to {admin}: no answer within {timeout:?}")]
    Timeout {
        admin: SocketAddr,
        timeout: Duration,
    },
    #[error("POST /v1/reload to {admin}: not an HTTP answer")]
    Malformed { admin: SocketAddr },
}

/// `steer reload`'s ask of the agent at `admin`, with its token: the answer's status and body
/// (the report as JSON, or `{"error": ...}`). A reload waits for the instances it stops and
/// starts, so `timeout` is long.
pub async fn ask(
    admin: SocketAddr,
    token: &str,
    timeout: Duration,
) -> Result<(u16, String), AskError> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(admin).await?;
        let head = format!(
            "POST /v1/reload HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await?;
        let mut answer = Vec::new();
        // The admin API's answers are small; a runaway one is cut.
        stream.take(1 << 20).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
    };
    let text = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| AskError::Timeout { admin, timeout })?
        .map_err(|source| AskError::Io { admin, source })?;
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or(AskError::Malformed { admin })?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_owned()))
}

/// What a reload changes, between the specs running and the new config's.
#[derive(Debug, Default)]
pub struct Plan {
    /// By service id (the running config's order, which a reload keeps).
    pub services: Vec<(usize, ServiceSpec)>,
    pub instances_added: Vec<InstanceSpec>,
    pub instances_removed: Vec<String>,
    pub instances_changed: Vec<InstanceSpec>,
}

impl Plan {
    /// The plan from `services` and `instances` (running) to `new_services` and
    /// `new_instances`; `Err` names what a running agent cannot change: a service added,
    /// removed, renamed or moved (its address or mode), an instance of a fleet group (the
    /// fleet's rolling change owns those).
    pub fn between(
        services: &[ServiceSpec],
        new_services: &[ServiceSpec],
        instances: &[InstanceSpec],
        new_instances: &[InstanceSpec],
    ) -> Result<Plan, ReloadError> {
        let restart = |what: String| Err(ReloadError::NeedsRestart(what));
        let names = |s: &[ServiceSpec]| s.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        if names(services) != names(new_services) {
            return restart(format!(
                "the services (from {:?} to {:?}; adding, removing or reordering them)",
                names(services),
                names(new_services)
            ));
        }
        let mut plan = Plan::default();
        for (id, (old, new)) in services.iter().zip(new_services).enumerate() {
            if old.address != new.address || old.proxy.mode != new.proxy.mode {
                return restart(format!(
                    "service `{}`'s address or mode (from {} {:?} to {} {:?})",
                    old.name, old.address, old.proxy.mode, new.address, new.proxy.mode
                ));
            }
            if old != new {
                plan.services.push((id, new.clone()));
            }
        }
        for new in new_instances {
            match instances.iter().find(|i| i.name == new.name) {
                None => plan.instances_added.push(new.clone()),
                Some(old) if old != new => plan.instances_changed.push(new.clone()),
                Some(_) => {}
            }
        }
        for old in instances {
            if !new_instances.iter().any(|i| i.name == old.name) {
                plan.instances_removed.push(old.name.clone());
            }
        }
        // Before and after: an instance taken out of its group is the group's too.
        let touched = |name: &String| {
            plan.instances_removed.contains(name)
                || plan.instances_changed.iter().any(|i| &i.name == name)
        };
        let grouped = plan
            .instances_added
            .iter()
            .chain(&plan.instances_changed)
            .chain(instances.iter().filter(|i| touched(&i.name)))
            .find_map(|i| i.group.as_ref().map(|g| (&i.name, g)));
        if let Some((name, group)) = grouped {
            return restart(format!(
                "instance `{name}` of fleet group `{group}` (change a group's arguments with \
                 POST /v1/fleet/groups/{group}/params)"
            ));
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{BackendSpec, Policy, ProxyMode, Weight};

    fn service(name: &str, port: u16) -> ServiceSpec {
        let backend = BackendSpec {
            address: "10.0.1.2:8080".parse().expect("address"),
            weight: Weight::ONE,
            max_connections: 0,
            models: Vec::new(),
        };
        ServiceSpec {
            name: name.to_owned(),
            address: std::net::SocketAddrV4::new([10, 0, 0, 1].into(), port),
            ..crate::fake::chat_service(vec![backend], None)
        }
    }

    fn instance(name: &str, port: u16, group: Option<&str>) -> InstanceSpec {
        InstanceSpec {
            name: name.to_owned(),
            binary: "llama-server".to_owned(),
            model: "m.gguf".to_owned(),
            port,
            extra_args: Vec::new(),
            settings: crate::spec::InstanceSettings::default(),
            driver: crate::supervisor::default_driver(name),
            backend: None,
            group: group.map(str::to_owned),
        }
    }

    #[test]
    fn only_what_changed_is_planned() -> Result<(), ReloadError> {
        let services = [service("a", 80), service("b", 81)];
        let instances = [instance("x", 8080, None), instance("y", 8081, None)];
        let plan = Plan::between(&services, &services, &instances, &instances)?;
        assert!(plan.services.is_empty() && plan.instances_added.is_empty());
        assert!(plan.instances_removed.is_empty() && plan.instances_changed.is_empty());

        let mut b = service("b", 81);
        b.policy = Policy::LeastConnections;
        b.proxy.max_per_backend = 1;
        let new_services = [service("a", 80), b.clone()];
        let mut y = instance("y", 8081, None);
        y.extra_args = vec!["-c".to_owned(), "2048".to_owned()];
        let new_instances = [y.clone(), instance("z", 8082, None)];
        let plan = Plan::between(&services, &new_services, &instances, &new_instances)?;
        assert_eq!(plan.services, vec![(1, b)]);
        assert_eq!(plan.instances_added, vec![instance("z", 8082, None)]);
        assert_eq!(plan.instances_removed, vec!["x".to_owned()]);
        assert_eq!(plan.instances_changed, vec![y]);
        Ok(())
    }

    #[test]
    fn what_needs_a_restart_is_named() {
        let services = [service("a", 80), service("b", 81)];
        let refused = |new: &[ServiceSpec], old_i: &[InstanceSpec], new_i: &[InstanceSpec]| {
            match Plan::between(&services, new, old_i, new_i) {
                Err(ReloadError::NeedsRestart(what)) => what,
                other => panic!("expected a refusal, got {other:?}"),
            }
        };
        let what = refused(&[service("a", 80)], &[], &[]);
        assert!(what.contains(r#"from ["a", "b"] to ["a"]"#), "{what}");
        let what = refused(&[service("a", 80), service("c", 81)], &[], &[]);
        assert!(what.contains("the services"), "{what}");
        let what = refused(&[service("a", 80), service("b", 82)], &[], &[]);
        assert!(what.starts_with("service `b`'s address or mode"), "{what}");
        let mut http = service("b", 81);
        http.proxy.mode = ProxyMode::Http;
        let what = refused(&[service("a", 80), http], &[], &[]);
        assert!(what.contains("Http"), "{what}");
        let grouped = [instance("g", 8080, Some("gen"))];
        let what = refused(&services, &[], &grouped);
        assert!(what.contains("instance `g` of fleet group `gen`"), "{what}");
        let what = refused(&services, &grouped, &[]);
        assert!(what.contains("fleet group `gen`"), "{what}");
        let what = refused(&services, &grouped, &[instance("g", 8080, None)]);
        assert!(
            what.contains("fleet group `gen`"),
            "out of its group: {what}"
        );
    }
}
