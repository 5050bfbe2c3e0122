//! This host as the agent sees it: its own IPv4 addresses, its interfaces and the ports its
//! kernel picks for outgoing connections.

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

/// Whether `addr` is assigned to one of this host's interfaces: a backend there is local (the
/// kernel path reaches it through the host's stack), a VIP there needs no route of the agent's.
pub fn has_address(addr: Ipv4Addr) -> Result<bool, nix::Error> {
    Ok(nix::ifaddrs::getifaddrs()?.any(|a| {
        a.address
            .and_then(|sa| sa.as_sockaddr_in().map(|sin| sin.ip()))
            == Some(addr)
    }))
}

/// What a config is checked against besides itself: read from the host at `steer run` and
/// `steer check-config`, set by hand in unit tests.
#[derive(Clone, Debug)]
pub struct Facts {
    /// Interface names in this network namespace.
    pub interfaces: Vec<String>,
    /// `net.ipv4.ip_local_port_range`, when it can be read.
    pub ephemeral_ports: Option<RangeInclusive<u16>>,
    /// `net.ipv4.ip_local_reserved_ports`: ports the kernel never picks for its own.
    pub reserved_ports: Vec<RangeInclusive<u16>>,
    /// Root, which loading BPF needs: otherwise `dataplane = "xdp"` runs as `userspace`.
    pub loads_bpf: bool,
}

impl Facts {
    /// This host's (its network namespace's) interfaces and ephemeral ports, and whether this
    /// process may load BPF. The interfaces are the kernel's list for this process's namespace:
    /// /sys/class/net would show the namespace of whoever mounted /sys.
    pub fn read() -> Facts {
        let interfaces = nix::net::if_::if_nameindex()
            .map(|list| {
                list.iter()
                    .filter_map(|i| i.name().to_str().ok().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let ephemeral_ports = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|text| {
                let mut ports = text.split_whitespace().map(|p| p.parse::<u16>().ok());
                Some(ports.next()??..=ports.next()??)
            });
        let reserved_ports = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
            .map(|text| port_ranges(&text))
            .unwrap_or_default();
        Facts {
            interfaces,
            ephemeral_ports,
            reserved_ports,
            loads_bpf: nix::unistd::geteuid().is_root(),
        }
    }
}

/// `8080,9148-9150` as the kernel writes a port list; what does not parse is left out.
fn port_ranges(text: &str) -> Vec<RangeInclusive<u16>> {
    text.trim()
        .split(',')
        .filter_map(|part| {
            let (start, end) = part.split_once('-').unwrap_or((part, part));
            Some(start.trim().parse().ok()?..=end.trim().parse().ok()?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_read_as_the_kernel_writes_them() {
        assert_eq!(port_ranges("8080,9148-9150\n"), [8080..=8080, 9148..=9150]);
        assert_eq!(port_ranges("\n"), Vec::<RangeInclusive<u16>>::new());
    }

    #[test]
    fn this_host_has_loopback_and_an_ephemeral_range() {
        let facts = Facts::read();
        assert!(facts.interfaces.iter().any(|i| i == "lo"), "{facts:?}");
        let ports = facts.ephemeral_ports.expect("ip_local_port_range");
        assert!(
            ports.start() <= ports.end() && *ports.start() > 0,
            "{ports:?}"
        );
    }

    #[test]
    fn loopback_is_ours_and_a_documentation_address_is_not() -> Result<(), nix::Error> {
        assert!(has_address(Ipv4Addr::LOCALHOST)?);
        // 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never assigned to a real host.
        assert!(!has_address(Ipv4Addr::new(192, 0, 2, 1))?);
        Ok(())
    }
}
