//! This host's own IPv4 addresses, as its interfaces list them.

use std::net::Ipv4Addr;

/// Whether `addr` is assigned to one of this host's interfaces: a backend there is local (the
/// kernel path reaches it through the host's stack), a VIP there needs no route of the agent's.
pub fn has_address(addr: Ipv4Addr) -> Result<bool, nix::Error> {
    Ok(nix::ifaddrs::getifaddrs()?.any(|a| {
        a.address
            .and_then(|sa| sa.as_sockaddr_in().map(|sin| sin.ip()))
            == Some(addr)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_ours_and_a_documentation_address_is_not() -> Result<(), nix::Error> {
        assert!(has_address(Ipv4Addr::LOCALHOST)?);
        // 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never assigned to a real host.
        assert!(!has_address(Ipv4Addr::new(192, 0, 2, 1))?);
        Ok(())
    }
}
