//! `cargo xtask demo`: brings up a client and a load-balancer host in network namespaces; the
//! agent on the LB supervises two real llama-servers (file store, policy `slots`) and balances
//! the service address over them with XDP. The client sends chat completions to the VIP; the
//! demo shows which server answered each, the agent's backend table, a change of one server's
//! arguments through the admin API (drained, restarted, back), and then cleans up.

#![expect(
    clippy::print_stdout,
    reason = "the demo's output is for a person to read"
)]

use std::{
    net::{SocketAddr, SocketAddrV4},
    process::ExitCode,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tests::{
    llama::{llama_server_path, model_path},
    netns,
    topology::{HttpConn, LB_CLIENT_SIDE, Topology, VIP, sibling_binary},
};

const CHATS: usize = 6;
const INSTANCES: [(&str, u16); 2] = [("llama-a", 8091), ("llama-b", 8092)];

/// One chat completion through the VIP: (server alias, answer text, time taken).
async fn chat(question: &str) -> Result<(String, String, Duration), String> {
    let start = Instant::now();
    let mut conn = HttpConn::connect(SocketAddr::V4(VIP))
        .await
        .map_err(|e| format!("connect to {VIP}: {e}"))?;
    let body = json!({"messages": [{"role": "user", "content": question}], "max_tokens": 16});
    let response = conn
        .try_request(
            "POST",
            "/v1/chat/completions",
            Some(body.to_string().as_bytes()),
        )
        .await
        .map_err(|e| format!("request: {e}"))?;
    let answer: Value = serde_json::from_slice(&response.body)
        .map_err(|e| format!("HTTP {}: not JSON: {e}", response.status))?;
    let model = answer["model"].as_str().unwrap_or("?").to_owned();
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .replace('\n', " ");
    Ok((model, text, start.elapsed()))
}

fn print_backends(topo: &Topology) {
    println!(
        "  {:<4} {:<18} {:<7} {:<9} {:<8} {:>6} {:>6} {:>6}",
        "id", "address", "kind", "state", "healthy", "slots", "idle", "flows"
    );
    for b in topo.backends_view() {
        println!(
            "  {:<4} {:<18} {:<7} {:<9} {:<8} {:>6} {:>6} {:>6}",
            b["id"].to_string(),
            b["address"].as_str().unwrap_or("?"),
            b["kind"].as_str().unwrap_or("?"),
            b["state"].as_str().unwrap_or("?"),
            b["healthy"].to_string(),
            b["total_slots"].to_string(),
            b["idle_slots"].to_string(),
            b["new_flows"].to_string()
        );
    }
}

/// Waits (bounded) until every backend is listed healthy and active.
fn wait_up(topo: &Topology) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if topo
            .backends_view()
            .iter()
            .all(|b| b["healthy"] == true && b["state"] == "active")
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn main() -> ExitCode {
    if !netns::is_root() {
        eprintln!(
            "steer-demo needs root (network namespaces, veth, XDP): run `cargo xtask demo` as root"
        );
        return ExitCode::FAILURE;
    }
    let (binary, model) = (llama_server_path(), model_path());
    println!("bringing up namespaces: a client and the load balancer ...");
    let mut topo = Topology::new("demo", "slots", 1, &sibling_binary("steer-test-backend"));
    topo.set_service_backends(Vec::new());
    let store = topo.dir.join("instances.toml");
    for (name, port) in INSTANCES {
        topo.add_instance(&format!(
            "name = \"{name}\"\nbinary = {binary:?}\nmodel = {model:?}\nport = {port}\n\
             args = [\"-np\", \"2\", \"-c\", \"2048\", \"--alias\", \"{name}\"]\n\
             config_driver = {{ type = \"file\", path = {store:?}, name = \"{name}\" }}\n",
        ));
    }
    println!(
        "  client {} -> VIP {VIP} -> LB {} (net.ipv4.ip_forward=0, native XDP)",
        topo.client.name(),
        topo.lb.name()
    );
    println!("agent config:\n{}", topo.config());
    topo.start_agent();
    if !wait_up(&topo) {
        eprintln!(
            "the llama-servers did not come up; agent log:\n{}",
            topo.agent_log()
        );
        return ExitCode::FAILURE;
    }
    println!(
        "agent ready, supervising {} llama-servers:",
        INSTANCES.len()
    );
    print_backends(&topo);

    println!("\n{CHATS} chat completions from the client to {VIP}:");
    let questions = [
        "Say hi.",
        "Name a colour.",
        "Count to three.",
        "Name a fruit.",
    ];
    let answers = topo.client.block_on(|| async {
        let mut answers = Vec::new();
        for i in 0..CHATS {
            answers.push(chat(questions[i % questions.len()]).await);
        }
        answers
    });
    let mut failed = false;
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            Ok((model, text, took)) => {
                println!(
                    "  #{} {:<8} {:>5} ms  {text}",
                    i + 1,
                    model,
                    took.as_millis()
                );
            }
            Err(e) => {
                failed = true;
                println!("  #{} failed: {e}", i + 1);
            }
        }
    }
    println!("\nGET /v1/backends:");
    print_backends(&topo);

    let (name, port) = INSTANCES[0];
    println!(
        "\nPOST /v1/instances/{name}/params {{\"args\": {{\"-c\": 1024}}}} (drain, restart, rejoin):"
    );
    let applied = topo.admin(
        "POST",
        &format!("/v1/instances/{name}/params"),
        Some(&json!({"args": {"-c": 1024}})),
    );
    println!("  {applied}");
    wait_up(&topo);
    let backend = SocketAddrV4::new(LB_CLIENT_SIDE, port);
    let view = topo.backend_view(backend).unwrap_or_default();
    println!(
        "  {backend} is {} again",
        view["state"].as_str().unwrap_or("?")
    );

    let status = topo.stop_agent(nix::sys::signal::Signal::SIGTERM);
    println!(
        "\nagent stopped ({status}): XDP detached, llama-servers stopped; removing namespaces"
    );
    drop(topo);
    if status.success() && !failed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
