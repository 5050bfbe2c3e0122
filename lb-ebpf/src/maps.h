/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Kernel-side maps. The agent is the only writer of services, backends,
 * rr_ring, ifaces and tx_ports; the program writes conntrack, counts and
 * counters. Value and key types come from steer_abi.h. */
#ifndef STEER_MAPS_H
#define STEER_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "steer_abi.h"

#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))

enum {
	STEER_CT_DEFAULT_ENTRIES = 262144,
	STEER_EVENTS_BYTES = 256 * 1024,
	/* The reader is woken only once this much waits (see emit_event). */
	STEER_EVENTS_WAKEUP_BYTES = STEER_EVENTS_BYTES / 4,
	/* How long a cached next hop and a flow's last_seen stand before they
	 * are refreshed: route and neighbour changes take effect within it. */
	STEER_REFRESH_NS = 1000000000,
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

/* murmur3's 32-bit finalizer; lb-common's client_hash is the same function.
 * It spreads client addresses over Maglev tables and VIPs over vip_filter. */
static __always_inline __u32 client_hash(__u32 addr)
{
	addr ^= addr >> 16;
	addr *= 0x85ebca6b;
	addr ^= addr >> 13;
	addr *= 0xc2b2ae35;
	addr ^= addr >> 16;
	return addr;
}

/* CLOCK_MONOTONIC_COARSE, read once a jiffy per CPU: bpf_jiffies64 is inlined
 * by the verifier, while each clock helper is a call, dear on every packet.
 * The coarse clock itself moves once a jiffy, so nothing is lost. */
static __always_inline __u64 coarse_now(void)
{
	__u32 key = 0;
	struct clock_cache *c = bpf_map_lookup_elem(&clock, &key);
	__u64 jiffies = bpf_jiffies64();

	if (!c)
		return bpf_ktime_get_coarse_ns();
	if (c->jiffies != jiffies) {
		c->jiffies = jiffies;
		c->now_ns = bpf_ktime_get_coarse_ns();
	}
	return c->now_ns;
}

/* Whether daddr may be a VIP (filter slots are shared, so this can be wrong
 * only the safe way). */
static __always_inline int maybe_vip(__be32 daddr)
{
	__u32 slot = client_hash(daddr) % STEER_VIP_FILTER_SIZE;
	__u32 *services = bpf_map_lookup_elem(&vip_filter, &slot);

	return services && *services;
}

static __always_inline void count(__u32 service_id, enum steer_counter counter, __u64 n)
{
	__u32 key = service_id * STEER_COUNTER_MAX + counter;
	__u64 *value = bpf_map_lookup_elem(&service_stats, &key);

	if (value)
		*value += n;
}

static __always_inline void count_backend(__u32 backend_id, __u64 bytes, __u64 new_flows)
{
	struct steer_backend_stats *stats = bpf_map_lookup_elem(&backend_stats, &backend_id);

	if (!stats)
		return;
	stats->packets++;
	stats->bytes += bytes;
	stats->new_flows += new_flows;
}

/* A wakeup is an interrupt to another CPU (a VM exit under a hypervisor),
 * too dear for every new flow: the agent drains the ring on a short timer,
 * and the record that makes the waiting data cross a quarter of the ring
 * (the reserved one included) wakes it early, once per crossing. */
static __always_inline __u64 events_wakeup(void)
{
	const __u64 record = (BPF_RINGBUF_HDR_SZ + sizeof(struct steer_event) + 7) & ~7ULL;
	__u64 waiting = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);

	if (waiting >= STEER_EVENTS_WAKEUP_BYTES && waiting < STEER_EVENTS_WAKEUP_BYTES + record)
		return BPF_RB_FORCE_WAKEUP;
	return BPF_RB_NO_WAKEUP;
}

static __always_inline void emit_event(enum steer_event_kind kind, __u32 service_id,
				       __u32 backend_id, __u32 client_addr, __u16 client_port)
{
	struct steer_event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);

	if (!ev)
		return;
	ev->timestamp_ns = bpf_ktime_get_ns();
	ev->kind = kind;
	ev->service_id = service_id;
	ev->backend_id = backend_id;
	ev->client_addr = client_addr;
	ev->client_port = client_port;
	ev->_pad0 = 0;
	ev->_pad1 = 0;
	bpf_ringbuf_submit(ev, events_wakeup());
}

#endif /* STEER_MAPS_H */
