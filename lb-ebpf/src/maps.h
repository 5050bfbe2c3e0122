/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Kernel-side maps, and nothing else: the helpers that read and write them
 * live in the header of their concern. The agent writes the service and
 * backend tables (services, service_keys, vip_filter, backends, rr_ring,
 * maglev) and the interfaces (ifaces, tx_ports), and seeds snat_cursor; the
 * program writes the rest. Conntrack entries are the program's, deleted by
 * the agent's expiry; backend_conns is changed by both, atomically. Shared
 * key and value types come from steer_abi.h; the kernel-only ones are here,
 * beside their map. */
#ifndef STEER_MAPS_H
#define STEER_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "steer_abi.h"

enum {
	STEER_CT_DEFAULT_ENTRIES = 262144,
	STEER_EVENTS_BYTES = 256 * 1024,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct steer_service_key);
	__type(value, struct steer_service);
	__uint(max_entries, STEER_MAX_SERVICES);
} services SEC(".maps");

/* Index: service id; value: the VIP:port the id serves, zero when none. A
 * packet of a tracked flow checks here (an array read) that its service is
 * still there, instead of looking services up (a hash lookup). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct steer_service_key);
	__uint(max_entries, STEER_MAX_SERVICES);
} service_keys SEC(".maps");

/* Index: client_hash(vip) % STEER_VIP_FILTER_SIZE; value: how many services
 * have a VIP of that slot. Zero: the destination is no VIP, and the packet
 * skips the services lookup (lb-common's vip_filter_slot is the same index). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, STEER_VIP_FILTER_SIZE);
} vip_filter SEC(".maps");

/* Index: backend id. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct steer_backend);
	__uint(max_entries, STEER_MAX_BACKENDS);
} backends SEC(".maps");

/* Index: backend id. mmap-ed by the agent, which shares the counts. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct steer_backend_conns);
	__uint(max_entries, STEER_MAX_BACKENDS);
} backend_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct steer_backend_stats);
	__uint(max_entries, STEER_MAX_BACKENDS);
} backend_stats SEC(".maps");

/* Index: service id * STEER_RR_RING_SIZE + position; value: backend slot. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, STEER_MAX_SERVICES * STEER_RR_RING_SIZE);
} rr_ring SEC(".maps");

/* Index: service id * STEER_MAGLEV_SIZE + position; value: backend slot. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, STEER_MAX_SERVICES * STEER_MAGLEV_SIZE);
} maglev SEC(".maps");

/* Index: service id. Shared by all CPUs so the ring is walked in order. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, STEER_MAX_SERVICES);
} rr_cursor SEC(".maps");

/* Index: service id * STEER_COUNTER_MAX + enum steer_counter. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, STEER_MAX_SERVICES * STEER_COUNTER_MAX);
} service_stats SEC(".maps");

/* Client -> VIP tuple to the flow's backend and SNAT address. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct steer_flow_key);
	__type(value, struct steer_flow_fwd);
	__uint(max_entries, STEER_CT_DEFAULT_ENTRIES);
} ct_fwd SEC(".maps");

/* Backend -> SNAT tuple back to the client and VIP. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct steer_flow_key);
	__type(value, struct steer_flow_rev);
	__uint(max_entries, STEER_CT_DEFAULT_ENTRIES);
} ct_rev SEC(".maps");

/* Kernel-only: how a new flow reaches a remote backend, cached so that a SYN
 * does not pay for a route lookup. Looked up again when older than
 * STEER_REFRESH_NS or found for another address (the id got a new backend). */
struct backend_route {
	__u64 checked_ns;
	__u32 addr;		/* the backend address it was found for */
	__u32 snat_addr;	/* the egress interface's source address */
	struct steer_next_hop hop;
};

/* Index: backend id. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct backend_route);
	__uint(max_entries, STEER_MAX_BACKENDS);
} backend_routes SEC(".maps");

/* Index backend id: where the backend's next SNAT port search starts. Ports
 * are handed out in order, so each comes back as late as the range allows: a
 * backend that closed first keeps the tuple in TIME_WAIT (60 s), and refuses
 * a SYN on it whose timestamps are older, as another client's may be. The
 * agent seeds it at random when it loads the program, so a restarted agent
 * does not hand out its previous run's ports again first. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, STEER_MAX_BACKENDS);
} snat_cursor SEC(".maps");

/* Key: ifindex of an interface Steer is attached to. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct steer_iface);
	__uint(max_entries, STEER_MAX_INTERFACES);
} ifaces SEC(".maps");

/* Key and value: ifindex. Only these interfaces are redirect targets. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, STEER_MAX_INTERFACES);
} tx_ports SEC(".maps");

/* Flow and refusal events for the agent (events.h). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, STEER_EVENTS_BYTES);
} events SEC(".maps");

/* Kernel-only, per CPU: the coarse clock as last read and the jiffy it was
 * read in. */
struct clock_cache {
	__u64 jiffies;
	__u64 now_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct clock_cache);
	__uint(max_entries, 1);
} clock SEC(".maps");

#endif /* STEER_MAPS_H */
