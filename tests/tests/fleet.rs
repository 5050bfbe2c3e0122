//! A fleet through a real 3-member etcd cluster on loopback: three agents (hosts `h1`..`h3`),
//! each supervising one real llama-server and balancing service `chat` on its own address over
//! every host's instance.
//!
//! Shown, in order: every instance registers and is a backend of every balancer; garbage keys in
//! the prefix are skipped; two balancers active-active put 1,000 affinity keys on the same
//! backends; a crashed llama-server leaves the other balancers within 1 s and comes back revived;
//! one etcd member down changes nothing, two (no quorum) leave every balancer serving its last
//! fleet with 0 failed requests under load while exporting its staleness, and once they are back
//! a change made then arrives; a SIGKILLed agent leaves the others within its lease TTL + 1 s;
//! and an agent started while etcd is down comes up from its cached fleet and catches up when etcd
//! returns.
//!
//! The hosts share the root namespace's loopback (each agent's service on its own port, its
//! instance on its own): what the fleet does is the same as across namespaces, and a host that
//! disappears (its namespace deleted, its power cut) is an agent that stops renewing its lease,
//! which SIGKILL shows.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::bench::free_port;
use tests::blocking::{http, load, scratch};
use tests::etcd::EtcdCluster;
use tests::llama::{llama_server_path, model_path};
use tests::netns;

/// The lease TTL the agents register with.
const TTL: Duration = Duration::from_secs(3);
/// Upper bound for any wait (a llama-server loading its model included).
const WAIT: Duration = Duration::from_secs(90);
/// Keys sent through each of two balancers.
const KEYS: usize = 1000;

/// One agent (a "host") and what it serves.
struct Host {
    name: String,
    config: PathBuf,
    log: PathBuf,
    admin: SocketAddr,
    vip: SocketAddr,
    /// Its llama-servers' addresses: its backends in every balancer.
    instances: Vec<SocketAddr>,
    agent: Option<Child>,
}

impl Host {
    /// Host `name`'s agent config in `dir`: service `chat` (`service` lines: policy and so on)
    /// over its `instances` (each a llama-server of the test model, in `group` if given), in the
    /// fleet at `endpoints` under `prefix`.
    fn new(
        dir: &Path,
        name: &str,
        endpoints: &[String],
        prefix: &str,
        service: &str,
        instances: &[&str],
        group: Option<&str>,
    ) -> Host {
        let [admin, vip] =
            [free_port(), free_port()].map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
        let endpoints: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
        let mut text = format!(
            "[agent]\ninterfaces = [\"lo\"]\nadmin_addr = \"{admin}\"\n\
             admin_token_file = \"{name}.token\"\ndataplane = \"userspace\"\n\
             shutdown_timeout = \"2s\"\n\n\
             [fleet]\nendpoints = [{endpoints}]\nprefix = \"{prefix}\"\nhost = \"{name}\"\n\
             lease_ttl = \"{ttl}s\"\ncache = \"{name}-fleet.json\"\n\n\
             [[service]]\nname = \"chat\"\naddress = \"{vip}\"\nmode = \"http\"\n{service}\n",
            endpoints = endpoints.join(", "),
            ttl = TTL.as_secs(),
        );
        let mut addresses = Vec::new();
        for instance in instances {
            let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
            addresses.push(address);
            let group = group.map_or(String::new(), |g| format!("group = \"{g}\"\n"));
            text += &format!(
                "\n[[instance]]\nname = \"{instance}\"\nbinary = {binary:?}\nmodel = {model:?}\n\
                 port = {port}\nservice = \"chat\"\naddress = \"{address}\"\n{group}\
                 args = [\"--host\", \"127.0.0.1\", \"-np\", \"2\", \"-c\", \"1024\", \"-t\", \"1\", \
                 \"--alias\", \"smol\"]\ndebounce = \"10ms\"\n\
                 config_driver = {{ type = \"file\", path = {store:?}, name = \"{instance}\" }}\n",
                binary = path_str(&llama_server_path()),
                model = path_str(&model_path()),
                port = address.port(),
                store = path_str(&dir.join(format!("{name}-args.toml"))),
            );
        }
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, text).expect("write the config");
        Host {
            log: dir.join(format!("{name}.log")),
            name: name.to_owned(),
            config,
            admin,
            vip,
            instances: addresses,
            agent: None,
        }
    }

    /// POST `body` to the admin API's `path` with this agent's token: (status, body).
    fn post(&self, path: &str, body: Option<&str>) -> (u16, String) {
        let auth = format!("Bearer {}", self.token());
        http(self.admin, "POST", path, &[("Authorization", &auth)], body)
            .unwrap_or_else(|e| panic!("POST {path} on {}: {e}", self.name))
    }

    /// `steer fleet get` with this host's config (`--json`), its output; panics if it fails.
    fn fleet_get(&self, json: bool) -> String {
        let mut command = Command::new(tests::topology::steer_bin());
        command.args(["fleet", "get", "--config"]).arg(&self.config);
        if json {
            command.arg("--json");
        }
        let out = command.output().expect("run steer fleet get");
        assert!(
            out.status.success(),
            "steer fleet get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    }

    /// Adds `lines` to the config's `[fleet]` table.
    fn add_fleet_lines(&self, lines: &str) {
        let text = std::fs::read_to_string(&self.config).expect("the config");
        let text = text.replacen("[fleet]\n", &format!("[fleet]\n{lines}"), 1);
        std::fs::write(&self.config, text).expect("write the config");
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("the agent's log");
        let child = Command::new(tests::topology::steer_bin())
            .args(["run", "--log-format", "json", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log"))
            .stderr(log)
            .spawn()
            .expect("start steer");
        self.agent = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }

    /// One line on whether the agent runs, then its last warnings and errors.
    fn summary(&self) -> String {
        let state = match &self.agent {
            None => "not started".to_owned(),
            Some(agent) => {
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", agent.id()));
                // The state follows the command's closing parenthesis; Z is an exited child.
                match stat
                    .ok()
                    .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.to_owned()))
                {
                    Some(rest) if !rest.starts_with('Z') => format!("agent {} runs", agent.id()),
                    _ => format!("agent {} has exited", agent.id()),
                }
            }
        };
        let text = self.log_text();
        let warnings: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\""))
            .collect();
        let last = &warnings[warnings.len().saturating_sub(6)..];
        format!(
            "{}: {state}; last warnings:\n  {}",
            self.name,
            last.join("\n  ")
        )
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Value {
        let (status, body) = http(self.admin, "GET", path, &[], None)
            .unwrap_or_else(|e| panic!("GET {path} on {}: {e}\n{}", self.name, self.log_text()));
        assert_eq!(status, 200, "GET {path} on {}: {body}", self.name);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    fn try_get(&self, path: &str) -> Option<Value> {
        let (status, body) = http(self.admin, "GET", path, &[], None).ok()?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// `chat`'s backends as this balancer lists them: address to the backend's entry.
    fn backends(&self) -> BTreeMap<String, Value> {
        self.try_get("/v1/backends")
            .and_then(|v| v["backends"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|b| b["service"] == "chat")
            .map(|b| (b["address"].as_str().unwrap_or_default().to_owned(), b))
            .collect()
    }

    fn fleet(&self) -> Value {
        self.get("/v1/fleet")
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, text) = http(self.admin, "GET", "/metrics", &[], None).expect("/metrics");
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    }

    fn token(&self) -> String {
        let path = self.config.with_file_name(format!("{}.token", self.name));
        std::fs::read_to_string(path)
            .expect("the token")
            .trim()
            .to_owned()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `done` (polled every 20 ms) within `within`; how long it took. Panics with `what`
/// and the hosts' logs otherwise.
fn wait_for(
    hosts: &[Host],
    within: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > within {
            // Each host's state and warnings first: a long failure message is cut at its end.
            let summary: Vec<String> = hosts.iter().map(Host::summary).collect();
            let logs: Vec<String> = hosts
                .iter()
                .map(|h| format!("--- {} ---\n{}", h.name, tail(&h.log_text())))
                .collect();
            panic!(
                "{what}: not within {within:?}\n{}\n{}",
                summary.join("\n"),
                logs.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Whether `host` lists `address` as a healthy backend of `chat`.
fn serves(host: &Host, address: SocketAddr) -> bool {
    host.backends()
        .get(&address.to_string())
        .is_some_and(|b| b["healthy"] == true && b["state"] == "active")
}

/// Waits until every host's fleet view is (or is not) `connected`.
fn wait_connected(hosts: &[Host], connected: bool, within: Duration, what: &str) {
    wait_for(hosts, within, what, || {
        hosts.iter().all(|h| h.fleet()["connected"] == connected)
    });
}

/// Joins the `loads` sent through `hosts` (in order) and asserts none failed `during` what.
fn assert_none_failed(
    hosts: &[Host],
    loads: Vec<thread::JoinHandle<(u64, u64, String)>>,
    during: &str,
) {
    for (host, load) in hosts.iter().zip(loads) {
        let (sent, failed, last) = load.join().expect("load thread");
        eprintln!(
            "{}: {sent} chats through {during}, {failed} failed",
            host.name
        );
        assert!(sent > 0);
        assert_eq!(
            failed, 0,
            "{}: {failed} of {sent} failed, the last: {last}",
            host.name
        );
    }
}

/// The backend each access-log line of `log` names, by the key in its path
/// (`/steer-affinity/<key>`).
fn placements(log: &str) -> BTreeMap<String, String> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["target"] == "steer::access")
        .filter_map(|line| {
            let fields = &line["fields"];
            let key = fields["path"].as_str()?.strip_prefix("/steer-affinity/")?;
            Some((key.to_owned(), fields["backend"].as_str()?.to_owned()))
        })
        .collect()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

#[test]
fn a_fleet_through_etcd_registers_balances_alike_and_survives_losing_etcd() {
    netns::require_root("llama-server instances run as nobody");
    let dir = scratch("steer-fleet");
    let mut etcd = EtcdCluster::start(3);
    let prefix = format!("/steer/fleet/t{}", std::process::id());
    let affinity =
        "policy = \"cache_affinity\"\n[service.affinity]\nkey = [\"header:x-session-id\"]\n";
    let mut hosts: Vec<Host> = (1..=3)
        .map(|i| {
            let name = format!("h{i}");
            let instance = format!("i{i}");
            Host::new(
                &dir,
                &name,
                &etcd.endpoints(),
                &prefix,
                affinity,
                &[&instance],
                None,
            )
        })
        .collect();
    for host in &mut hosts {
        host.start();
    }
    let instances: Vec<SocketAddr> = hosts.iter().map(|h| h.instances[0]).collect();

    // 1. Registration: every instance is a healthy backend of every balancer.
    let took = wait_for(&hosts, WAIT, "every instance in every balancer", || {
        hosts
            .iter()
            .all(|h| instances.iter().all(|&i| serves(h, i)))
    });
    eprintln!("every instance healthy in every balancer after {took:?}");
    for host in &hosts {
        let fleet = host.fleet();
        assert_eq!(fleet["connected"], true, "{}: {fleet}", host.name);
        assert_eq!(
            fleet["hosts"],
            serde_json::json!(["h1", "h2", "h3"]),
            "{fleet}"
        );
        assert_eq!(
            fleet["instances"].as_array().map(Vec::len),
            Some(3),
            "{fleet}"
        );
        assert_eq!(fleet["backends"], 2, "the other hosts' instances: {fleet}");
        let local = &host.backends()[&host.instances[0].to_string()];
        assert_eq!(
            local["instance"],
            format!("i{}", &host.name[1..]),
            "{local}"
        );
    }

    // 2. Garbage in the prefix is skipped, counted, and changes nothing.
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
            .await
            .expect("etcd client");
        for (key, value) in [
            (format!("{prefix}/instances/h9/x"), "{not json".to_owned()),
            (
                format!("{prefix}/instances/h9/y"),
                r#"{"service":"chat","address":"nowhere","state":"ready"}"#.to_owned(),
            ),
            (format!("{prefix}/services/../../etc"), "x".to_owned()),
        ] {
            client.put(key, value, None).await.expect("put garbage");
        }
    });
    wait_for(
        &hosts,
        Duration::from_secs(10),
        "garbage keys counted",
        || {
            hosts
                .iter()
                .all(|h| h.fleet()["skipped_keys"].as_u64() >= Some(3))
        },
    );
    // Read back with `steer fleet get`, as etcd holds it.
    let text = hosts[0].fleet_get(false);
    for line in ["host h1: steer", "host h3: steer", "skipped"] {
        assert!(text.contains(line), "{line}: {text}");
    }
    for (host, instance) in [("h1", "i1"), ("h2", "i2"), ("h3", "i3")] {
        let want = format!("instance {host}/{instance}: Ready");
        assert!(text.contains(&want), "{want}: {text}");
    }
    let json: Value = serde_json::from_str(&hosts[0].fleet_get(true)).expect("fleet get --json");
    let keys = json["keys"].as_array().cloned().unwrap_or_default();
    assert!(
        keys.iter().all(|k| k["mod_revision"].as_i64() > Some(0)),
        "{json}"
    );
    let i1 = keys
        .iter()
        .find(|k| k["key"] == format!("{prefix}/instances/h1/i1"))
        .expect("i1's key");
    assert!(i1["lease"].as_i64() > Some(0), "under h1's lease: {i1}");
    assert_eq!(json["skipped"].as_array().map(Vec::len), Some(3), "{json}");
    for host in &hosts {
        assert_eq!(
            host.backends().len(),
            3,
            "{}: {:?}",
            host.name,
            host.backends()
        );
        assert!(host.metric("steer_fleet_skipped_keys_total") >= 3.0);
    }

    // 3. Active-active: the same key lands on the same backend through two balancers.
    for host in &hosts[..2] {
        for key in 0..KEYS {
            let key = format!("k{key}");
            let path = format!("/steer-affinity/{key}");
            http(host.vip, "GET", &path, &[("x-session-id", &key)], None)
                .unwrap_or_else(|e| panic!("{path} via {}: {e}", host.name));
        }
    }
    let through: Vec<BTreeMap<String, String>> = hosts[..2]
        .iter()
        .map(|h| placements(&h.log_text()))
        .collect();
    assert_eq!(through[0].len(), KEYS, "every key logged by h1");
    assert_eq!(through[1].len(), KEYS, "every key logged by h2");
    let differ: Vec<_> = through[0]
        .iter()
        .filter(|(key, backend)| through[1].get(*key) != Some(*backend))
        .collect();
    let mut spread: BTreeMap<&str, usize> = BTreeMap::new();
    for backend in through[0].values() {
        *spread.entry(backend).or_default() += 1;
    }
    eprintln!(
        "{KEYS} keys through h1 and h2: {} placed differently; spread {spread:?}",
        differ.len()
    );
    assert!(differ.is_empty(), "keys placed differently: {differ:?}");
    assert_eq!(
        spread.len(),
        3,
        "the keys spread over every host's backend: {spread:?}"
    );

    // 4. A crashed llama-server leaves every other balancer within 1 s, and comes back.
    let pid = hosts[0].get("/v1/instances/i1/params")["pid"]
        .as_i64()
        .expect("i1's pid");
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill i1's llama-server");
    let gone = |h: &Host| !serves(h, instances[0]);
    wait_for(
        &hosts,
        Duration::from_secs(5),
        "i1 out of h2 and h3",
        || hosts[1..].iter().all(gone),
    );
    let out = killed.elapsed();
    eprintln!("crashed llama-server out of the other balancers after {out:?}");
    assert!(
        out <= Duration::from_secs(1),
        "i1 left h2 and h3 after {out:?}"
    );
    wait_for(&hosts, WAIT, "i1 revived in every balancer", || {
        hosts.iter().all(|h| serves(h, instances[0]))
    });

    // 5. etcd: one member down changes nothing; two (no quorum) leave every balancer serving
    // its last fleet under load, stale and saying so; back, a change made then arrives.
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = hosts
        .iter()
        .map(|h| load(h.vip, Arc::clone(&stop)))
        .collect();
    etcd.stop(0);
    thread::sleep(Duration::from_secs(3));
    wait_connected(
        &hosts,
        true,
        Duration::from_secs(15),
        "connected again with one member down",
    );
    etcd.stop(1);
    wait_connected(
        &hosts,
        false,
        Duration::from_secs(20),
        "every agent sees etcd gone",
    );
    thread::sleep(Duration::from_secs(TTL.as_secs() * 2));
    for host in &hosts {
        let stale = host.metric("steer_fleet_stale_seconds");
        assert!(stale >= TTL.as_secs_f64(), "{}: stale {stale}", host.name);
        assert_eq!(host.metric("steer_fleet_connected"), 0.0);
        let (_, text) = http(host.admin, "GET", "/metrics", &[], None).expect("/metrics");
        tests::metrics::assert_promtool_clean(&text);
        for &instance in &instances {
            assert!(
                serves(host, instance),
                "{} still serves {instance}",
                host.name
            );
        }
    }
    etcd.restart(0, false);
    etcd.restart(1, false);
    etcd.wait_member(0);
    wait_connected(
        &hosts,
        true,
        Duration::from_secs(30),
        "every agent current again",
    );
    // A change after the quorum came back: h2 drains its instance by hand.
    let i2 = hosts[1].backends()[&instances[1].to_string()]["id"]
        .as_u64()
        .expect("i2's id");
    let (status, body) = hosts[1].post(&format!("/v1/backends/{i2}/drain"), None);
    assert_eq!(status, 200, "{body}");
    wait_for(
        &hosts,
        Duration::from_secs(5),
        "i2 draining in h1 and h3",
        || {
            [&hosts[0], &hosts[2]].iter().all(|h| {
                h.backends()
                    .get(&instances[1].to_string())
                    .is_some_and(|b| b["state"] == "draining")
            })
        },
    );
    let (status, body) = hosts[1].post(&format!("/v1/backends/{i2}/activate"), None);
    assert_eq!(status, 200, "{body}");
    stop.store(true, Ordering::Relaxed);
    assert_none_failed(&hosts, loads, "the quorum loss");

    // 6. A SIGKILLed agent (its llama-server dies with it) leaves the others within TTL + 1 s.
    wait_for(&hosts, WAIT, "i2 active again everywhere", || {
        hosts.iter().all(|h| serves(h, instances[1]))
    });
    // Its cache has caught up with the fleet (written within a second of a change).
    let cache = dir.join("h3-fleet.json");
    let i2_key = format!("{prefix}/instances/h2/i2");
    wait_for(
        &hosts,
        Duration::from_secs(5),
        "h3's cache up to date",
        || {
            std::fs::read_to_string(&cache)
                .ok()
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                .is_some_and(|c| c["entries"][&i2_key]["state"] == "ready")
        },
    );
    let killed = Instant::now();
    hosts[2].kill();
    let listed = |h: &Host| h.backends().contains_key(&instances[2].to_string());
    wait_for(
        &hosts,
        TTL + Duration::from_secs(5),
        "h3's instance gone",
        || !hosts[..2].iter().any(listed),
    );
    let out = killed.elapsed();
    eprintln!("SIGKILLed agent's instance out of every balancer after {out:?} (TTL {TTL:?})");
    assert!(out <= TTL + Duration::from_secs(1), "h3 left after {out:?}");

    // 7. Started while etcd is down, an agent serves its cached fleet, then catches up.
    for i in 0..3 {
        etcd.stop(i);
    }
    hosts[2].start();
    wait_for(
        &hosts,
        Duration::from_secs(30),
        "h3 serving the cached fleet",
        || {
            hosts[2]
                .try_get("/v1/fleet")
                .is_some_and(|f| f["from_cache"] == true)
                && instances[..2].iter().all(|&i| serves(&hosts[2], i))
        },
    );
    for i in 0..3 {
        etcd.restart(i, false);
    }
    etcd.wait_member(0);
    wait_for(
        &hosts,
        WAIT,
        "h3 current and back in every balancer",
        || {
            hosts[2]
                .try_get("/v1/fleet")
                .is_some_and(|f| f["connected"] == true && f["from_cache"] == false)
                && hosts.iter().all(|h| serves(h, instances[2]))
        },
    );

    drop(hosts);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The instances `host` lists that are not serving (healthy and active), among `of`.
fn out_of(host: &Host, of: &[SocketAddr]) -> usize {
    let backends = host.backends();
    of.iter()
        .filter(|a| {
            !backends
                .get(&a.to_string())
                .is_some_and(|b| b["healthy"] == true && b["state"] == "active")
        })
        .count()
}

/// Starts a rolling change of group `smol` through `host`; its id.
fn roll(host: &Host, args: Value) -> String {
    let body = serde_json::json!({ "args": args }).to_string();
    let (status, answer) = host.post("/v1/fleet/groups/smol/params", Some(&body));
    assert_eq!(status, 202, "{answer}");
    let answer: Value = serde_json::from_str(&answer).expect("JSON");
    answer["rollout"].as_str().expect("a rollout id").to_owned()
}

/// Waits until rollout `id` of group `smol` has ended, as `host` sees it; its record.
fn rolled(hosts: &[Host], host: &Host, id: &str) -> Value {
    let mut last = Value::Null;
    wait_for(
        hosts,
        Duration::from_secs(180),
        &format!("rollout {id} ended"),
        || {
            last = host.try_get("/v1/fleet/rollouts/smol").unwrap_or_default();
            last["id"] == id && last["state"] != "running"
        },
    );
    last
}

/// An instance's applied arguments, from its own agent.
fn applied(host: &Host, instance: &str) -> Value {
    host.get(&format!("/v1/instances/{instance}/params"))["applied"]["args"].clone()
}

#[test]
fn a_rolling_change_goes_one_instance_at_a_time_stops_at_a_failure_and_reaches_a_late_joiner() {
    netns::require_root("llama-server instances run as nobody");
    let dir = scratch("steer-rollout");
    let etcd = EtcdCluster::start(3);
    let prefix = format!("/steer/fleet/r{}", std::process::id());
    let round_robin = "policy = \"round_robin\"\n";
    let group = Some("smol");
    let mut hosts: Vec<Host> = [("a", ["a1", "a2"]), ("b", ["b1", "b2"])]
        .iter()
        .map(|(name, instances)| {
            Host::new(
                &dir,
                name,
                &etcd.endpoints(),
                &prefix,
                round_robin,
                instances,
                group,
            )
        })
        .collect();
    for host in &mut hosts {
        host.start();
    }
    let all: Vec<SocketAddr> = hosts.iter().flat_map(|h| h.instances.clone()).collect();
    wait_for(&hosts, WAIT, "all four instances in both balancers", || {
        hosts.iter().all(|h| out_of(h, &all) == 0)
    });

    // Under load through both balancers, with a watch on how many are out at once.
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = hosts
        .iter()
        .map(|h| load(h.vip, Arc::clone(&stop)))
        .collect();
    let most_out = Arc::new(AtomicU64::new(0));
    let monitor = {
        let (stop, most_out) = (Arc::clone(&stop), Arc::clone(&most_out));
        let views: Vec<(SocketAddr, String)> =
            hosts.iter().map(|h| (h.admin, h.name.clone())).collect();
        let all = all.clone();
        let dir = dir.clone();
        thread::spawn(move || {
            let watchers: Vec<Host> = views
                .into_iter()
                .map(|(admin, name)| Host {
                    log: dir.join(format!("{name}.log")),
                    config: dir.join(format!("{name}.toml")),
                    name,
                    admin,
                    vip: admin,
                    instances: Vec::new(),
                    agent: None,
                })
                .collect();
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                for host in &watchers {
                    most_out.fetch_max(out_of(host, &all) as u64, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(25));
            }
        })
    };

    // 1. A good change: every instance takes it, one at a time, nothing fails.
    let id = roll(&hosts[0], serde_json::json!({"--ctx-size": "1536"}));
    let record = rolled(&hosts, &hosts[0], &id);
    assert_eq!(record["state"], "done", "{record}");
    assert_eq!(
        record["steps"].as_array().map(Vec::len),
        Some(4),
        "{record}"
    );
    assert_eq!(record["by"], "a", "{record}");
    // Another agent reads the same record from etcd.
    assert_eq!(hosts[1].get("/v1/fleet/rollouts/smol")["state"], "done");
    for (host, instance) in [(0, "a1"), (0, "a2"), (1, "b1"), (1, "b2")] {
        assert_eq!(
            applied(&hosts[host], instance)["--ctx-size"],
            "1536",
            "{instance}"
        );
    }

    // 2. A failing change stops after its first instance, which is rolled back.
    let before: Vec<Value> = [(0, "a1"), (0, "a2"), (1, "b1"), (1, "b2")]
        .iter()
        .map(|&(h, i)| applied(&hosts[h], i))
        .collect();
    let id = roll(
        &hosts[1],
        serde_json::json!({"--cache-type-k": "bogus-type"}),
    );
    let record = rolled(&hosts, &hosts[1], &id);
    assert_eq!(record["state"], "failed", "{record}");
    let steps = record["steps"].as_array().cloned().unwrap_or_default();
    assert_eq!(steps.len(), 1, "stopped at the first: {record}");
    assert_eq!(steps[0]["applied"], false, "{record}");
    assert_eq!(steps[0]["restored"], true, "{record}");
    assert!(
        record["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("a/a1")),
        "{record}"
    );
    let after: Vec<Value> = [(0, "a1"), (0, "a2"), (1, "b1"), (1, "b2")]
        .iter()
        .map(|&(h, i)| applied(&hosts[h], i))
        .collect();
    assert_eq!(after, before, "no instance keeps the failed change");
    wait_for(&hosts, WAIT, "a1 back in both balancers", || {
        hosts.iter().all(|h| out_of(h, &all) == 0)
    });

    // 3. Two changes at once through two agents: the later waits for the earlier's lock.
    let first = roll(&hosts[0], serde_json::json!({"--batch-size": "256"}));
    let second = roll(&hosts[1], serde_json::json!({"--batch-size": "512"}));
    let mut seen = BTreeMap::new();
    wait_for(
        &hosts,
        Duration::from_secs(240),
        "both changes rolled",
        || {
            if let Some(r) = hosts[0].try_get("/v1/fleet/rollouts/smol") {
                let id = r["id"].as_str().unwrap_or_default().to_owned();
                seen.insert(id, r["state"].as_str().unwrap_or_default().to_owned());
            }
            // The group's record is the latest change's: the later one can replace the
            // earlier's within a poll, so each coordinator's own log says how its change ended.
            let done = |id: &str| {
                seen.get(id).is_some_and(|s| s == "done")
                    || hosts.iter().any(|h| {
                        h.log_text().contains(&format!(
                            "\"rolling change done\",\"group\":\"smol\",\"rollout\":\"{id}\""
                        ))
                    })
            };
            done(&first) && done(&second)
        },
    );
    stop.store(true, Ordering::Relaxed);
    monitor.join().expect("monitor");
    assert_none_failed(&hosts, loads, "three rolling changes");
    let most = most_out.load(Ordering::Relaxed);
    eprintln!("at most {most} of 4 instances out of a balancer at once");
    assert!(most <= 1, "{most} instances were out at once");
    let batch: Vec<Value> = [(0, "a1"), (0, "a2"), (1, "b1"), (1, "b2")]
        .iter()
        .map(|&(h, i)| applied(&hosts[h], i)["--batch-size"].clone())
        .collect();
    assert!(
        batch.iter().all(|b| b == &batch[0]),
        "one last change everywhere: {batch:?}"
    );

    let text = hosts[0].fleet_get(false);
    assert!(text.contains("group smol: last good"), "{text}");
    assert!(text.contains("rollout smol"), "{text}");

    // 4. A host that joins later starts with the group's last good arguments.
    let mut late = Host::new(
        &dir,
        "c",
        &etcd.endpoints(),
        &prefix,
        round_robin,
        &["c1"],
        group,
    );
    late.start();
    hosts.push(late);
    let want = batch[0].clone();
    wait_for(&hosts, WAIT, "c1 with the group's arguments", || {
        hosts[2]
            .try_get("/v1/instances/c1/params")
            .is_some_and(|p| {
                p["state"] == "running"
                    && p["applied"]["args"]["--ctx-size"] == "1536"
                    && p["applied"]["args"]["--batch-size"] == want
            })
    });
    assert!(
        applied(&hosts[2], "c1").get("--cache-type-k").is_none(),
        "never the failed change"
    );
    drop(hosts);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `openssl` with `args` in `dir`; panics with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a certificate and key signed by it for `name` with `usage` (in `dir`).
fn certificate(dir: &Path, name: &str, usage: &str) {
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
    )
    .expect("write the extensions");
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "1",
            "-extfile",
            &ext,
        ],
    );
}

/// etcd with TLS (client certificates required) and user/password authentication: an agent
/// with the CA, a client certificate and the right password registers; one with a wrong
/// password, and one without a client certificate, do not and say why; a rolling change through
/// the admin API needs its token.
#[test]
fn the_fleet_talks_to_etcd_over_tls_with_a_password_and_changes_need_the_token() {
    netns::require_root("the agents run as root, as in production");
    let dir = scratch("steer-fleet-tls");
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=steer-test-ca",
        ],
    );
    certificate(&dir, "etcd", "serverAuth,clientAuth");
    certificate(&dir, "steer", "clientAuth");
    let file = |name: &str| dir.join(name).display().to_string();
    let etcd = EtcdCluster::start_with(
        1,
        &[
            format!("--cert-file={}", file("etcd.pem")),
            format!("--key-file={}", file("etcd.key")),
            format!("--trusted-ca-file={}", file("ca.pem")),
            "--client-cert-auth".to_owned(),
        ],
    );
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let tls = || {
        let read = |name: &str| std::fs::read(dir.join(name)).expect("read a certificate");
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")))
            .identity(etcd_client::Identity::from_pem(
                read("steer.pem"),
                read("steer.key"),
            ))
    };
    runtime.block_on(async {
        let options = etcd_client::ConnectOptions::new().with_tls(tls());
        let mut client = etcd_client::Client::connect(etcd.endpoints(), Some(options))
            .await
            .expect("etcd over TLS");
        client
            .user_add("root", "s3cret", None)
            .await
            .expect("add root");
        client
            .user_grant_role("root", "root")
            .await
            .expect("grant root");
        client.auth_enable().await.expect("enable auth");
    });
    std::fs::write(dir.join("etcd.password"), "s3cret\n").expect("the password");
    std::fs::write(dir.join("wrong.password"), "guess\n").expect("a wrong password");
    let prefix = format!("/steer/fleet/tls{}", std::process::id());
    let round_robin = "policy = \"round_robin\"\n";
    let mut hosts: Vec<Host> = ["ok", "wrong", "nocert"]
        .iter()
        .map(|name| {
            Host::new(
                &dir,
                name,
                &etcd.endpoints(),
                &prefix,
                round_robin,
                &[],
                None,
            )
        })
        .collect();
    let tls_lines = |cert: bool| {
        let client = if cert {
            format!(
                ", cert = {:?}, key = {:?}",
                file("steer.pem"),
                file("steer.key")
            )
        } else {
            String::new()
        };
        format!("tls = {{ ca = {:?}{client} }}\n", file("ca.pem"))
    };
    hosts[0].add_fleet_lines(&format!(
        "user = \"root\"\npassword_file = \"etcd.password\"\n{}",
        tls_lines(true)
    ));
    hosts[1].add_fleet_lines(&format!(
        "user = \"root\"\npassword_file = \"wrong.password\"\n{}",
        tls_lines(true)
    ));
    hosts[2].add_fleet_lines(&format!(
        "user = \"root\"\npassword_file = \"etcd.password\"\n{}",
        tls_lines(false)
    ));
    for host in &mut hosts {
        host.start();
    }
    wait_for(
        &hosts,
        Duration::from_secs(30),
        "the agent with the right credentials registered",
        || {
            hosts[0]
                .try_get("/v1/fleet")
                .is_some_and(|f| f["registered"] == true && f["connected"] == true)
        },
    );
    assert_eq!(
        hosts[0].fleet()["hosts"],
        serde_json::json!(["ok"]),
        "only it"
    );
    wait_for(
        &hosts,
        Duration::from_secs(30),
        "the others say why they are not in",
        || {
            hosts[1]
                .log_text()
                .contains("authentication failed, invalid user ID or password")
                && hosts[2].log_text().contains("BadCertificate")
        },
    );
    for host in &hosts[1..] {
        let fleet = host.fleet();
        assert_eq!(fleet["registered"], false, "{}: {fleet}", host.name);
        assert_eq!(fleet["connected"], false, "{}: {fleet}", host.name);
    }
    // A change of the fleet through the admin API needs the agent's token.
    let body = r#"{"args": {"--ctx-size": "2048"}}"#;
    let (status, answer) = http(
        hosts[0].admin,
        "POST",
        "/v1/fleet/groups/smol/params",
        &[],
        Some(body),
    )
    .expect("POST");
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = hosts[0].post("/v1/fleet/groups/smol/params", Some(body));
    assert_eq!(status, 404, "no instance of the group: {answer}");
    let not_flags = r#"{"args": ["--ctx-size"]}"#;
    let (status, answer) = hosts[0].post("/v1/fleet/groups/smol/params", Some(not_flags));
    assert_eq!(status, 400, "{answer}");
    drop(hosts);
    let _ = std::fs::remove_dir_all(&dir);
}
