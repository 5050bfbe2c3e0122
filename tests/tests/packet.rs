//! Packet tests: crafted frames through the real XDP program with `BPF_PROG_TEST_RUN`, inside a
//! network namespace of their own whose routes and neighbours make `bpf_fib_lookup` succeed.
//! Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{backend_state, counter, policy};
use tests::{
    lab::*,
    packet::{ACK, FIN, Frame, PSH, RST, SYN, assert_only_nat_fields_changed, parse_checked},
    testrun::{XDP_PASS, XDP_REDIRECT},
};

#[test]
fn syn_to_vip_is_fully_natted_and_the_reply_reversed() {
    in_lab(policy::ROUND_ROBIN, |lab| {
        let c = client(40000);
        let (snat, backend) = lab.forward(c, SYN);
        assert_eq!(backend, BACKENDS[0], "cursor 0 of ring [0, 1] is slot 0");
        assert_eq!(lab.conns(0), 1);
        let flow = lab.flow(c).expect("conntrack entry for the client tuple");
        assert_eq!(flow.snat_port, snat.port().to_be());
        assert_eq!(lab.counter(counter::NEW_FLOWS), 1);

        lab.reply(backend, snat, SYN | ACK, c);
        // The rest of the flow follows conntrack, same backend and source port.
        assert_eq!(lab.forward(c, ACK | PSH), (snat, backend));
        lab.reply(backend, snat, ACK | PSH, c);
        assert_eq!(lab.conns(0), 1, "data packets do not change the count");
    });
}

/// A backend on this host: the SYN gets destination NAT only and goes to the stack; the reply
/// leaving through TC egress gets the VIP back as its source; FIN releases once.
#[test]
fn local_backend_gets_destination_nat_and_replies_are_undone_on_egress() {
    in_lab(policy::ROUND_ROBIN, |lab| {
        const TC_ACT_OK: u32 = 0;
        let local = SocketAddrV4::new(LB_CLIENT_SIDE, 8081);
        lab.set_only_local_backend(local);
        let c = client(40500);
        for flags in [SYN, ACK | PSH] {
            let input = Frame::tcp(c, VIP, flags).with_payload(b"hi").build();
            let (verdict, output) = lab.run(&input);
            assert_eq!(verdict, XDP_PASS, "to the local stack");
            assert_only_nat_fields_changed(&input, &output);
            let out = parse_checked(&output);
            assert_eq!((out.src, out.dst), (c, local), "destination NAT only");
            assert_eq!(&output[..12], &input[..12], "MACs untouched");
        }
        assert_eq!(lab.conns(0), 1);
        assert_eq!(lab.counter(counter::NEW_FLOWS), 1);

        let reply = Frame::tcp(local, c, SYN | ACK)
            .with_payload(b"there")
            .build();
        let (verdict, output) = lab.run_egress(&reply);
        assert_eq!(verdict, TC_ACT_OK);
        assert_only_nat_fields_changed(&reply, &output);
        let out = parse_checked(&output);
        assert_eq!((out.src, out.dst), (VIP, c), "the client sees the VIP");

        let other = Frame::tcp(local, client(40501), ACK).build();
        assert_eq!(
            lab.run_egress(&other),
            (TC_ACT_OK, other),
            "no flow: untouched"
        );

        let fin = Frame::tcp(local, c, FIN | ACK).build();
        assert_eq!(parse_checked(&lab.run_egress(&fin).1).src, VIP);
        assert_eq!(lab.conns(0), 0, "the backend's FIN releases");
        lab.run(&Frame::tcp(c, VIP, FIN | ACK).build());
        assert_eq!(lab.conns(0), 0, "once");
        assert_eq!(lab.counter(counter::CLOSED_FLOWS), 1);
    });
}

/// Once a service is taken away, the client packets of its open flows are no longer steered:
/// they pass untouched to the stack, and a new SYN opens nothing.
#[test]
fn flows_of_a_removed_service_are_passed_untouched() {
    in_lab(policy::ROUND_ROBIN, |lab| {
        let c = client(40700);
        lab.forward(c, SYN);
        lab.remove_service();
        for frame in [
            Frame::tcp(c, VIP, ACK).build(),
            Frame::tcp(client(40701), VIP, SYN).build(),
        ] {
            assert_eq!(lab.run(&frame), (XDP_PASS, frame.clone()));
        }
        assert_eq!(lab.counter(counter::NEW_FLOWS), 1);
    });
}

#[test]
fn round_robin_alternates_between_backends() {
    in_lab(policy::ROUND_ROBIN, |lab| {
        let chosen: Vec<SocketAddrV4> = (0..6)
            .map(|i| lab.forward(client(41000 + i), SYN).1)
            .collect();
        let expected: Vec<SocketAddrV4> = (0..6).map(|i| BACKENDS[i % 2]).collect();
        assert_eq!(chosen, expected);
    });
}

#[test]
fn established_flow_keeps_its_backend_when_it_turns_draining() {
    in_lab(policy::ROUND_ROBIN, |lab| {
        let c = client(40100);
        let (snat, backend) = lab.forward(c, SYN);
        assert_eq!(backend, BACKENDS[0]);
        lab.set_state(0, backend_state::DRAINING);
        lab.set_service(policy::ROUND_ROBIN, 2, &[1]);
        assert_eq!(
            lab.forward(c, ACK | PSH),
            (snat, backend),
            "open flow stays"
        );
        lab.reply(backend, snat, ACK, c);
        for port in 40101..40105 {
            assert_eq!(
                lab.forward(client(port), SYN).1,
                BACKENDS[1],
                "new flows avoid draining"
            );
        }
        // Even when the ring still names it, a draining backend gets no new flow.
        lab.set_service(policy::ROUND_ROBIN, 2, &[0, 1]);
        for port in 40110..40114 {
            assert_eq!(lab.forward(client(port), SYN).1, BACKENDS[1]);
        }
    });
}

#[test]
fn fin_and_rst_release_the_count_exactly_once() {
    in_lab(policy::LEAST_CONNECTIONS, |lab| {
        let c = client(40200);
        let (snat, backend) = lab.forward(c, SYN);
        assert_eq!(backend, BACKENDS[0]);
        assert_eq!(lab.conns(0), 1);
        lab.forward(c, FIN | ACK);
        assert_eq!(lab.conns(0), 0, "client FIN releases");
        lab.forward(c, FIN | ACK);
        lab.reply(backend, snat, FIN | ACK, c);
        assert_eq!(
            lab.conns(0),
            0,
            "retransmitted and reply FINs release nothing more"
        );
        assert_eq!(
            lab.forward(c, ACK),
            (snat, backend),
            "the close still gets through"
        );
        assert_eq!(lab.counter(counter::CLOSED_FLOWS), 1);

        // A reply RST on another flow releases once too.
        let c2 = client(40201);
        let (snat2, backend2) = lab.forward(c2, SYN);
        let id2 = BACKENDS
            .iter()
            .position(|b| *b == backend2)
            .expect("a backend") as u32;
        assert_eq!(lab.conns(id2), 1);
        lab.reply(backend2, snat2, RST, c2);
        lab.reply(backend2, snat2, RST, c2);
        lab.forward(c2, RST);
        assert_eq!(lab.conns(id2), 0);
        assert_eq!(lab.counter(counter::CLOSED_FLOWS), 2);

        // A SYN reusing the closed tuple is a new connection, counted again.
        let (_, again) = lab.forward(c, SYN);
        let id = BACKENDS
            .iter()
            .position(|b| *b == again)
            .expect("a backend") as u32;
        assert_eq!(lab.conns(id), 1);
    });
}

#[test]
fn least_connections_follows_open_connections_and_caps() {
    in_lab(policy::LEAST_CONNECTIONS, |lab| {
        lab.set_conns(0, 3, 0);
        for port in 0..3 {
            assert_eq!(lab.forward(client(40300 + port), SYN).1, BACKENDS[1]);
        }
        // 3 and 3: the tie goes to the lowest slot.
        assert_eq!(lab.forward(client(40310), SYN).1, BACKENDS[0]);
        // A cap of 4 on both, now at 4 and 3: one more fits, then nothing does.
        lab.set_backend(0, BACKENDS[0], backend_state::ACTIVE, 1, 4);
        lab.set_backend(1, BACKENDS[1], backend_state::ACTIVE, 1, 4);
        assert_eq!(lab.forward(client(40311), SYN).1, BACKENDS[1]);
        let full = Frame::tcp(client(40312), VIP, SYN).build();
        let (verdict, output) = lab.run(&full);
        assert_eq!(
            verdict, XDP_PASS,
            "no backend with room: the SYN goes to the stack"
        );
        assert_eq!(output, full, "passed untouched");
        assert_eq!(lab.counter(counter::NO_BACKEND), 1);
    });
}

/// Policy slots: most free slots (idle at the poll less steered since), then fewer connections,
/// then the lowest slot; every new flow counts as steered until the agent's next poll. Only
/// polled backends, whose cap the agent writes as their slot count, have room.
#[test]
fn slots_prefers_free_slots_and_counts_steered_flows() {
    in_lab(policy::SLOTS, |lab| {
        let [b0, b1] = BACKENDS;
        lab.set_backend(0, b0, backend_state::ACTIVE, 1, 8);
        lab.set_backend(1, b1, backend_state::ACTIVE, 1, 8);
        lab.set_idle_slots(0, 1);
        lab.set_idle_slots(1, 2);
        let picks: Vec<SocketAddrV4> = (0..5)
            .map(|i| lab.forward(client(42000 + i), SYN).1)
            .collect();
        // Free 1,2 -> 1; 1,1 tie -> fewer connections; 0,1 -> 1; then none free: fewer
        // connections, and at 2 and 2 the lowest slot.
        assert_eq!(picks, [b1, b0, b1, b0, b0]);
        let counts = |lab: &Lab, id| {
            let c = lab.backend_conns(id);
            (c.active, c.steered)
        };
        assert_eq!((counts(lab, 0), counts(lab, 1)), ((3, 3), (2, 2)));

        // A closed flow gives its connection back but stays steered: the poll decides.
        lab.forward(client(42000), FIN | ACK);
        assert_eq!(counts(lab, 1), (1, 2));
        // The agent publishes a poll that saw slot 1's flows: 2 idle, its steered forgotten.
        lab.set_idle_slots(1, 2);
        lab.set_conns(1, 1, 0);
        assert_eq!(lab.forward(client(42010), SYN).1, b1);
        assert_eq!(counts(lab, 1), (2, 1));
        // Not active: never chosen, whatever its free slots.
        lab.set_backend(1, b1, backend_state::DRAINING, 1, 8);
        lab.set_idle_slots(1, 9);
        assert_eq!(lab.forward(client(42011), SYN).1, b0);
        // Never polled (no cap yet): no room, whatever its idle slots.
        lab.set_backend(1, b1, backend_state::ACTIVE, 1, 0);
        lab.set_idle_slots(1, 9);
        assert_eq!(lab.forward(client(42012), SYN).1, b0);
        lab.set_backend(0, b0, backend_state::ACTIVE, 1, 0);
        let (verdict, _) = lab.run(&Frame::tcp(client(42013), VIP, SYN).build());
        assert_eq!(verdict, XDP_PASS, "none polled: no backend, to the stack");
    });
}

#[test]
fn source_ports_never_collide_for_one_backend() {
    in_lab(policy::ROUND_ROBIN, |lab| {
        lab.set_service(policy::ROUND_ROBIN, 2, &[0]);
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000u16 {
            let (snat, backend) = lab.forward(client(20000 + i), SYN);
            assert_eq!(backend, BACKENDS[0]);
            assert!(
                seen.insert(snat.port()),
                "source port {} used twice",
                snat.port()
            );
        }
        assert_eq!(lab.conns(0), 2000);
    });
}

/// `ip ARGS` in the calling thread's namespace (the lab's, inside `in_lab`).
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A flow keeps its next hop in conntrack, and new flows the one of their backend, and both look
/// it up again about once a second: after a neighbour's MAC changes, both directions of a flow
/// and a new flow reach the new MAC, and once the neighbour is gone the packets are passed
/// untouched to the stack (which resolves it) and counted as no route.
#[test]
fn flows_follow_next_hop_changes_within_a_second() {
    in_lab(policy::ROUND_ROBIN, |lab| {
        const LONGER_THAN_REFRESH: std::time::Duration = std::time::Duration::from_millis(1200);
        lab.set_service(policy::ROUND_ROBIN, 2, &[0]);
        let c = client(40600);
        let (snat, backend) = lab.forward(c, SYN);
        lab.reply(backend, snat, SYN | ACK, c);
        let new_macs = [[0x02, 0, 0, 0, 2, 0x99], [0x02, 0, 0, 0, 1, 0x99]];
        for (addr, mac, dev) in [
            (*backend.ip(), new_macs[0], "pbe"),
            (CLIENT_IP, new_macs[1], "pcli"),
        ] {
            let (addr, mac) = (addr.to_string(), mac_str(mac));
            ip(&[
                "neigh",
                "replace",
                &addr,
                "lladdr",
                &mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        std::thread::sleep(LONGER_THAN_REFRESH);
        let to_backend = Frame::tcp(c, VIP, ACK).build();
        let to_client = Frame::tcp(backend, snat, ACK).build();
        let new_flow = Frame::tcp(client(40601), VIP, SYN).build();
        for (frame, mac) in [
            (&to_backend, new_macs[0]),
            (&to_client, new_macs[1]),
            (&new_flow, new_macs[0]),
        ] {
            let (verdict, output) = lab.run(frame);
            assert_eq!(verdict, XDP_REDIRECT);
            assert_eq!(parse_checked(&output).dst_mac, mac, "the new MAC");
        }

        ip(&["neigh", "del", &backend.ip().to_string(), "dev", "pbe"]);
        ip(&["neigh", "del", &CLIENT_IP.to_string(), "dev", "pcli"]);
        std::thread::sleep(LONGER_THAN_REFRESH);
        let another_flow = Frame::tcp(client(40602), VIP, SYN).build();
        for frame in [to_backend, to_client, another_flow] {
            assert_eq!(lab.run(&frame), (XDP_PASS, frame.clone()), "no neighbour");
        }
        assert_eq!(lab.counter(counter::NO_ROUTE), 3);
    });
}

/// The port search tries 64 ports in a row, so a range of 64 fills to its last port, and the
/// next SYN is passed.
#[test]
fn a_small_snat_range_fills_to_its_last_port() {
    const PORTS: std::ops::RangeInclusive<u16> = 20000..=20063;
    let ns = build_namespace();
    ns.run(|| {
        let mut lab =
            Lab::load_snat_ports(policy::ROUND_ROBIN, PORTS, 10_000_000_000, 62_000_000_000);
        lab.set_service(policy::ROUND_ROBIN, 2, &[0]);
        let ports: std::collections::HashSet<u16> = (0..64)
            .map(|i| lab.forward(client(41000 + i), SYN).0.port())
            .collect();
        assert_eq!(ports, PORTS.collect());
        let refused = Frame::tcp(client(41064), VIP, SYN).build();
        assert_eq!(lab.run(&refused), (XDP_PASS, refused.clone()));
        assert_eq!(lab.counter(counter::NO_SNAT_PORT), 1);
    });
}

/// SNAT ports are handed out in order, so a closed flow's port comes back only after every other
/// port of the range was used (a backend keeps a tuple it closed in TIME_WAIT, where a SYN from
/// another client may be refused).
#[test]
fn snat_ports_are_handed_out_in_order() {
    const PORTS: std::ops::RangeInclusive<u16> = 20000..=20007;
    let ns = build_namespace();
    ns.run(|| {
        let mut lab = Lab::load_snat_ports(policy::ROUND_ROBIN, PORTS, 0, 0);
        lab.set_service(policy::ROUND_ROBIN, 2, &[0]);
        let first = client(42000);
        let (snat, backend) = lab.forward(first, SYN);
        lab.reply(backend, snat, FIN | ACK, first);
        lab.forward(first, FIN | ACK);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let ports: Vec<u16> = (1..=8)
            .map(|i| lab.forward(client(42000 + i), SYN).0.port())
            .collect();
        assert_eq!(snat.port(), 20000);
        assert_eq!(
            ports,
            [20001, 20002, 20003, 20004, 20005, 20006, 20007, 20000]
        );
    });
}

/// With one SNAT port, a closed flow's reply tuple stays its own while packets of the close come
/// and for its hold after the last, then a new flow takes it over; an open flow's tuple is never
/// taken. The hold is the closed-flow timeout when the client closes first, and the backend's
/// TIME_WAIT when the backend does or when the two FINs cross (then both keep TIME_WAIT, and the
/// backend could refuse another client's SYN on the tuple).
#[test]
fn closed_flows_reply_tuple_is_taken_over_after_its_hold() {
    use std::{thread::sleep, time::Duration};
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Close {
        ClientFirst,
        BackendFirst,
        /// The client's FIN, then the backend's sent before it saw the client's.
        Crossed,
    }
    const PORT: u16 = 20000;
    const CLOSED: Duration = Duration::from_secs(2);
    const TIME_WAIT: Duration = Duration::from_secs(4);
    let ns = build_namespace();
    ns.run(|| {
        for close in [Close::ClientFirst, Close::BackendFirst, Close::Crossed] {
            let mut lab = Lab::load_snat_ports(
                policy::ROUND_ROBIN,
                PORT..=PORT,
                CLOSED.as_nanos() as u64,
                TIME_WAIT.as_nanos() as u64,
            );
            // Ring [0]: every flow goes to the same backend, so all want the same tuple.
            lab.set_service(policy::ROUND_ROBIN, 2, &[0]);
            let (first, second, third) = (client(40800), client(40801), client(40802));
            let (snat, backend) = lab.forward(first, SYN);
            assert_eq!(snat.port(), PORT);
            let refused = Frame::tcp(second, VIP, SYN).build();
            assert_eq!(
                lab.run(&refused),
                (XDP_PASS, refused.clone()),
                "open flow's tuple"
            );

            // The backend's FIN acknowledges the client's (data and FIN) unless they cross.
            let client_fin_end =
                Frame::tcp(first, VIP, FIN | ACK).seq + CLIENT_PAYLOAD.len() as u32 + 1;
            let mut backend_fin = Frame::tcp(backend, snat, FIN | ACK);
            backend_fin.ack = match close {
                Close::Crossed => client_fin_end - 1,
                _ => client_fin_end,
            };
            if close == Close::BackendFirst {
                assert_eq!(lab.run(&backend_fin.build()).0, XDP_REDIRECT);
                assert_eq!(lab.forward(first, FIN | ACK), (snat, backend));
            } else {
                assert_eq!(lab.forward(first, FIN | ACK), (snat, backend));
                assert_eq!(lab.run(&backend_fin.build()).0, XDP_REDIRECT);
            }
            sleep(CLOSED / 2);
            // The last ACK of the close holds the tuple for the whole hold again.
            assert_eq!(lab.forward(first, ACK), (snat, backend));
            let last_ack = std::time::Instant::now();
            sleep(CLOSED * 2 / 3);
            assert_eq!(
                lab.run(&refused),
                (XDP_PASS, refused.clone()),
                "held after the close ({close:?})"
            );
            let mut refusals = 2;
            if close == Close::ClientFirst {
                sleep(CLOSED * 3 / 4);
            } else {
                sleep(CLOSED * 3 / 4);
                assert_eq!(
                    lab.run(&refused),
                    (XDP_PASS, refused.clone()),
                    "past the closed timeout, still in the backend's TIME_WAIT ({close:?})"
                );
                refusals += 1;
                sleep((TIME_WAIT + CLOSED / 4).saturating_sub(last_ack.elapsed()));
            }
            assert_eq!(lab.counter(counter::NO_SNAT_PORT), refusals);
            assert_eq!(
                lab.forward(third, SYN),
                (snat, backend),
                "taken over ({close:?})"
            );
            lab.reply(backend, snat, SYN | ACK, third);
            assert_eq!(lab.conns(0), 1, "the first flow released its count once");
        }
    });
}

/// A client reusing a closed flow's tuple while no backend can take it: its SYN goes to the stack
/// (the proxy serves it), and so must the rest of that connection, not the old flow's backend.
#[test]
fn a_passed_syn_on_a_closed_tuple_leaves_its_connection_to_the_stack() {
    const PORT: u16 = 20000;
    let ns = build_namespace();
    ns.run(|| {
        let mut lab = Lab::load_snat_ports(
            policy::ROUND_ROBIN,
            PORT..=PORT,
            10_000_000_000,
            62_000_000_000,
        );
        lab.set_service(policy::ROUND_ROBIN, 2, &[0]);
        let c = client(40900);
        let (snat, backend) = lab.forward(c, SYN);
        lab.reply(backend, snat, FIN | ACK, c);
        assert_eq!(lab.forward(c, FIN | ACK), (snat, backend));
        lab.forward(c, ACK);

        // The only SNAT port is held after the close: the new SYN is passed.
        let syn = Frame::tcp(c, VIP, SYN).build();
        assert_eq!(lab.run(&syn), (XDP_PASS, syn.clone()));
        assert_eq!(lab.counter(counter::NO_SNAT_PORT), 1);
        for flags in [ACK, ACK | PSH, FIN | ACK] {
            let packet = Frame::tcp(c, VIP, flags).with_payload(b"GET /").build();
            assert_eq!(
                lab.run(&packet),
                (XDP_PASS, packet.clone()),
                "flags {flags:#04x} of the passed connection went to the old flow's backend"
            );
        }
        assert!(lab.flow(c).is_none(), "the closed flow's entry is gone");
        assert_eq!(lab.conns(0), 0, "released once, not again");
    });
}

/// Flow events wake a reader blocked on the ring (the agent, through edge-triggered epoll) once,
/// when a quarter of the ring waits, not for every new flow (each wakeup is an interrupt to
/// another CPU); the agent drains the ring on a timer besides.
#[test]
fn flow_events_wake_the_reader_once_when_a_quarter_of_the_ring_waits() {
    use aya::maps::RingBuf;
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    const RING_BYTES: usize = 256 * 1024;
    // Each record: its 8-byte header and the event, 8-aligned.
    const RECORD: usize = (8 + size_of::<lb_common::Event>()).next_multiple_of(8);
    in_lab(policy::ROUND_ROBIN, |lab| {
        let mut ring = RingBuf::try_from(lab.ebpf_mut().take_map("events").expect("events map"))
            .expect("a ringbuf");
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
        epoll
            .add(
                &ring,
                EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, 0),
            )
            .expect("watch the ring");
        let woken = || {
            let mut ready = [EpollEvent::empty()];
            epoll
                .wait(&mut ready, EpollTimeout::ZERO)
                .expect("epoll_wait")
                > 0
        };
        // The event that makes a quarter of the ring wait (itself included) wakes the reader.
        let wakes_at = (RING_BYTES / 4).div_ceil(RECORD);
        let mut flows = 0;
        while !woken() {
            assert!(flows < 2 * wakes_at, "no wakeup after {flows} flow events");
            lab.forward(client(10000 + flows as u16), SYN);
            flows += 1;
        }
        assert_eq!(flows, wakes_at, "woken by the event that filled a quarter");
        for more in 0..100 {
            lab.forward(client(20000 + more), SYN);
            flows += 1;
        }
        assert!(!woken(), "no wakeup per event past a quarter");
        let mut read = 0;
        while ring.next().is_some() {
            read += 1;
        }
        assert_eq!(read, flows, "every event is in the ring");
    });
}

#[test]
fn frames_steer_does_not_handle_pass_byte_identical() {
    in_lab(policy::ROUND_ROBIN, |lab| {
        let syn = Frame::tcp(client(40400), VIP, SYN);
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        let other_host = SocketAddrV4::new(Ipv4Addr::new(10, 210, 2, 2), 80);
        cases.push((
            "TCP to a non-VIP address",
            Frame::tcp(client(1), other_host, SYN).build(),
        ));
        let other_port = SocketAddrV4::new(*VIP.ip(), 443);
        cases.push((
            "TCP to the VIP on another port",
            Frame::tcp(client(1), other_port, SYN).build(),
        ));
        cases.push((
            "non-SYN to the VIP without a flow",
            Frame::tcp(client(2), VIP, ACK).build(),
        ));
        cases.push((
            "UDP to the VIP",
            Frame {
                protocol: 17,
                ..syn.clone()
            }
            .build(),
        ));
        cases.push((
            "first fragment (MF)",
            Frame {
                frag_field: 0x2000,
                ..syn.clone()
            }
            .build(),
        ));
        cases.push((
            "later fragment",
            Frame {
                frag_field: 0x0010,
                ..syn.clone()
            }
            .build(),
        ));
        cases.push((
            "IP options",
            Frame {
                ip_option_words: 1,
                ..syn.clone()
            }
            .build(),
        ));
        let whole = syn.clone().with_payload(b"0123456789").build();
        cases.push(("truncated payload", whole[..whole.len() - 4].to_vec()));
        cases.push(("truncated TCP header", whole[..14 + 20 + 12].to_vec()));
        cases.push(("truncated IP header", whole[..14 + 12].to_vec()));
        cases.push(("Ethernet header only", whole[..14].to_vec()));
        let mut vlan = whole.clone();
        vlan.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
        cases.push(("VLAN-tagged", vlan));
        let mut arp = whole.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        cases.push(("ARP", arp));
        let mut bad_doff = whole.clone();
        bad_doff[14 + 20 + 12] = 4 << 4;
        cases.push(("TCP data offset below 5", bad_doff));
        let unknown_reply = Frame::tcp(BACKENDS[0], SocketAddrV4::new(LB_BACKEND_SIDE, 16500), ACK);
        cases.push(("reply-like packet of no flow", unknown_reply.build()));
        let outside_snat = Frame::tcp(BACKENDS[0], SocketAddrV4::new(LB_BACKEND_SIDE, 61000), ACK);
        cases.push(("to a port outside the SNAT range", outside_snat.build()));

        for (name, frame) in cases {
            let (verdict, output) = lab.run(&frame);
            assert_eq!(verdict, XDP_PASS, "{name}: verdict");
            assert_eq!(output, frame, "{name}: frame changed");
        }
        assert_eq!(lab.conns(0) + lab.conns(1), 0, "no flow was opened");
    });
}

/// xorshift64*: a fixed seed makes every run check the same cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The two paths choose alike: over 500 random map states (stale rings and tables included),
/// the kernel's choice for a SYN equals the policy model's and the userspace proxy's (`Gate`,
/// reading the kernel's own connection array and the table's routes built from the same state).
#[test]
fn kernel_and_proxy_choices_match_the_policy_model() {
    use lb_userspace::dataplane::Dataplane;
    use lb_userspace::policy::{BackendView, ServiceView, choose, maglev_table, rr_ring};
    use lb_userspace::proxy::ServiceProxy;
    use lb_userspace::spec::{Policy, ProxyMode, ProxySpec, ServiceSpec, UpstreamTimeouts};
    use lb_userspace::table::{PoolRoute, Route};
    use std::{sync::Arc, time::Duration};

    in_lab(policy::ROUND_ROBIN, |lab| {
        // The kernel's own connection array, as the agent shares it with the proxy.
        let counts = lab.maps().conn_counts();
        let (routes, published) = tokio::sync::watch::channel(Arc::new(Vec::new()));
        let proxy = ProxySpec {
            mode: ProxyMode::L4,
            // 0: each backend's own max_connections, as the kernel reads it.
            max_per_backend: 0,
            queue_size: 0,
            queue_timeout: Duration::ZERO,
            upstream: UpstreamTimeouts::default(),
            max_retries: 0,
            retry_window: Duration::ZERO,
            max_request_body: 0,
            max_client_connections: 1,
            client_header_timeout: Duration::ZERO,
            client_idle_timeout: Duration::ZERO,
            client_body_timeout: Duration::ZERO,
        };
        let service = ServiceSpec {
            name: "model".to_owned(),
            address: VIP,
            policy: Policy::RoundRobin,
            backends: Vec::new(),
            health: None,
            slots: None,
            proxy,
            pools: Vec::new(),
            default_pool: 0,
            affinity: None,
            ejection: None,
        };
        let requests = Arc::new(lb_userspace::requests::RequestCounts::new(64));
        let proxied = ServiceProxy::new(&service, 0, &counts, requests, &published);
        let gate = proxied.default_gate();
        let mut rng = Rng(0x5eed_cafe_f00d_0001);
        let (mut chosen, mut refused) = (0, 0);
        for case in 0..500u16 {
            let policy = [
                policy::ROUND_ROBIN,
                policy::LEAST_CONNECTIONS,
                policy::MAGLEV,
                policy::SLOTS,
            ][rng.below(4) as usize];
            let backend_count = 1 + rng.below(u64::from(MODEL_SLOTS)) as u32;
            let views: Vec<BackendView> = (0..MODEL_SLOTS)
                .map(|_| BackendView {
                    state: [
                        backend_state::ACTIVE,
                        backend_state::ACTIVE,
                        backend_state::DRAINING,
                        backend_state::DOWN,
                    ][rng.below(4) as usize],
                    weight: rng.below(4) as u32,
                    max_conns: [0, 0, 1 + rng.below(4) as u32][rng.below(3) as usize],
                    conns: rng.below(6),
                    idle_slots: rng.below(5) as u32,
                    steered: rng.below(6),
                })
                .collect();
            // The agent's ring, or a stale one naming any slot, as between two agent writes.
            let ring: Vec<u32> = if rng.below(3) == 0 {
                (0..1 + rng.below(12))
                    .map(|_| rng.below(u64::from(backend_count)) as u32)
                    .collect()
            } else {
                let active: Vec<(u32, u32)> = (0..backend_count)
                    .filter(|&s| views[s as usize].state == backend_state::ACTIVE)
                    .map(|s| (s, views[s as usize].weight))
                    .collect();
                rr_ring(&active)
            };
            let cursor = if rng.below(2) == 0 {
                rng.below(16)
            } else {
                rng.next()
            };

            for (slot, view) in views.iter().enumerate() {
                let slot = slot as u32;
                let addr = model_backend(slot);
                lab.set_backend(slot, addr, view.state, view.weight, view.max_conns);
                lab.set_idle_slots(slot, view.idle_slots);
                lab.set_conns(slot, view.conns, view.steered);
            }
            // Maglev: the agent's table, or one naming any slot, as after a change of backends.
            let maglev: Vec<u32> = match (policy, rng.below(3)) {
                (policy::MAGLEV, 0) => (0..lb_common::MAGLEV_SIZE)
                    .map(|_| rng.below(u64::from(backend_count)) as u32)
                    .collect(),
                (policy::MAGLEV, _) => {
                    let active: Vec<_> = (0..backend_count)
                        .filter(|&s| views[s as usize].state == backend_state::ACTIVE)
                        .map(|s| (s, views[s as usize].weight, model_backend(s)))
                        .collect();
                    maglev_table(&active)
                }
                _ => Vec::new(),
            };
            if maglev.is_empty() && policy == policy::MAGLEV {
                // No active backend: the kernel's table is whatever was there; so is the model's.
                lab.set_maglev(&vec![0; lb_common::MAGLEV_SIZE as usize]);
            } else {
                lab.set_maglev(&maglev);
            }
            // As the table writes: the tables first, then the entry that announces them.
            lab.set_service(policy, backend_count, &ring);
            lab.set_cursor(cursor);
            let from = SocketAddrV4::new(
                Ipv4Addr::new(10, 210, 1, 2 + rng.below(200) as u8),
                10000 + case,
            );

            let service = ServiceView {
                policy,
                id: 0,
                backend_count,
                ring: &ring,
                maglev: &maglev,
                backends: &views,
            };
            let expected = choose(&service, cursor, *from.ip());
            routes.send_replace(Arc::new(vec![Route {
                id: 0,
                backend_count,
                backends: (0..)
                    .zip(&views)
                    .map(|(slot, view)| (*view, model_backend(slot)))
                    .collect(),
                // The kernel's entry has no cap until polled (under `slots`: no room).
                polled: (0..)
                    .zip(&views)
                    .filter(|(_, view)| view.max_conns > 0)
                    .fold(0, |bits, (slot, _): (u32, _)| bits | 1 << slot),
                // As the table publishes a service without pools: one over every backend.
                pools: vec![PoolRoute {
                    policy: Policy::ALL
                        .into_iter()
                        .find(|p| p.abi() == Some(policy))
                        .expect("a kernel policy"),
                    ring: ring.clone(),
                    maglev: maglev.clone(),
                    affinity: None,
                    members: u64::MAX,
                }],
            }]));
            assert_eq!(
                gate.choose_at(cursor, *from.ip()),
                expected,
                "case {case}: the proxy's choice; {service:?} cursor {cursor}"
            );
            let service = ServiceView {
                maglev: &[],
                ..service
            }; // for messages
            let input = Frame::tcp(from, VIP, SYN).build();
            let (verdict, output) = lab.run(&input);
            match expected {
                Some(id) => {
                    assert_eq!(
                        verdict,
                        XDP_REDIRECT,
                        "case {case}: model chose {id}, kernel passed; {service:?} cursor {cursor}, \
                         no_route {} no_backend {} no_port {}",
                        lab.counter(counter::NO_ROUTE),
                        lab.counter(counter::NO_BACKEND),
                        lab.counter(counter::NO_SNAT_PORT)
                    );
                    let dst = parse_checked(&output).dst;
                    assert_eq!(
                        dst,
                        model_backend(id),
                        "case {case}: {service:?} cursor {cursor}"
                    );
                    chosen += 1;
                }
                None => {
                    assert_eq!(
                        verdict, XDP_PASS,
                        "case {case}: model chose none: {service:?}"
                    );
                    refused += 1;
                }
            }
        }
        // The cases exercise both outcomes, not just one.
        assert!(
            chosen > 100 && refused > 20,
            "chosen {chosen}, refused {refused}"
        );
    });
}
