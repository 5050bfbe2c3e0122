//! The VIP made local (`ip route replace local VIP/32 dev lo`), so SYNs from other hosts (passed
//! by XDP, or every one without it) reach the proxy's listener; removed on exit.

use std::net::Ipv4Addr;

use tracing::warn;

#[derive(Debug, thiserror::Error)]
#[error("`ip {args}`: {message}")]
pub struct RouteError {
    args: String,
    message: String,
}

/// A local route that delivers a VIP to this host's stack, deleted on drop.
#[derive(Debug)]
pub struct LocalRoute {
    vip: Ipv4Addr,
}

impl LocalRoute {
    /// Route `vip` locally unless it is one of the host's addresses already (then `None`: that
    /// route is not ours to delete). `replace`, so a route a killed agent left behind is taken.
    pub fn add(vip: Ipv4Addr) -> Result<Option<Self>, RouteError> {
        if vip.is_loopback() || crate::host::has_address(vip).unwrap_or(false) {
            return Ok(None);
        }
        ip_route("replace", vip)?;
        Ok(Some(LocalRoute { vip }))
    }
}

impl Drop for LocalRoute {
    fn drop(&mut self) {
        if let Err(error) = ip_route("del", self.vip) {
            warn!(%error, "removing the VIP's local route");
        }
    }
}

fn ip_route(verb: &str, vip: Ipv4Addr) -> Result<(), RouteError> {
    let args = [
        "route".to_owned(),
        verb.to_owned(),
        "local".to_owned(),
        format!("{vip}/32"),
        "dev".to_owned(),
        "lo".to_owned(),
        "table".to_owned(),
        "local".to_owned(),
    ];
    let error = |message: String| RouteError {
        args: args.join(" "),
        message,
    };
    let output = std::process::Command::new("ip")
        .args(&args)
        .output()
        .map_err(|e| error(e.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(error(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}
