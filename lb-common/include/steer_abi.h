/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The one definition of every type the kernel programs and the agent share.
 *
 * lb-common/src/lib.rs mirrors each type as #[repr(C)]; a test reads the
 * compiled object's BTF and compares sizes, member offsets and enum values
 * with the Rust side. Constants are enums, never #defines, so they reach BTF.
 * Addresses and ports are kept in network byte order, exactly as on the wire.
 */
#ifndef STEER_ABI_H
#define STEER_ABI_H

#include <linux/types.h>

enum steer_limits {
	STEER_MAX_SERVICES = 64,
	STEER_MAX_BACKENDS_PER_SERVICE = 64,
	/* Backend ids are service_id * STEER_MAX_BACKENDS_PER_SERVICE + slot. */
	STEER_MAX_BACKENDS = 4096,
	/* Round-robin schedule entries per service. */
	STEER_RR_RING_SIZE = 256,
	STEER_MAX_INTERFACES = 64,
	/* Maglev lookup table entries per service: a prime well above 100x
	 * the backends of a service, so a backend change moves ~1/N of clients. */
	STEER_MAGLEV_SIZE = 16381,
	/* Table entries tried from the client's own when its backend has no room. */
	STEER_MAGLEV_PROBES = 16,
	/* Slots of the VIP filter, index client_hash(vip) % size (hash.h; lb_common::vip_filter_slot). */
	STEER_VIP_FILTER_SIZE = 4096,
};

enum steer_policy {
	STEER_POLICY_ROUND_ROBIN = 0,
	STEER_POLICY_LEAST_CONNECTIONS = 1,
	/* Client-address affinity through a Maglev table built by the agent. */
	STEER_POLICY_MAGLEV = 2,
	/* Most free llama.cpp slots: idle at the agent's last poll less steered since. */
	STEER_POLICY_SLOTS = 3,
};

/* Zero is DOWN, so an unwritten backend entry is never chosen. */
enum steer_backend_state {
	STEER_BACKEND_DOWN = 0,
	STEER_BACKEND_ACTIVE = 1,
	STEER_BACKEND_DRAINING = 2,
};

enum steer_backend_kind {
	STEER_BACKEND_REMOTE = 0,
	STEER_BACKEND_LOCAL = 1,
};

/* Per-service counters, index service_id * STEER_COUNTER_MAX + counter. */
enum steer_counter {
	STEER_CNT_NEW_FLOWS = 0,
	STEER_CNT_FWD_PACKETS = 1,
	STEER_CNT_FWD_BYTES = 2,
	STEER_CNT_REPLY_PACKETS = 3,
	STEER_CNT_REPLY_BYTES = 4,
	/* A SYN found no active backend with room: passed to the stack. */
	STEER_CNT_NO_BACKEND = 5,
	/* No route, neighbour or egress port for the next hop: passed. */
	STEER_CNT_NO_ROUTE = 6,
	/* Every source port tried for the backend was taken: passed. */
	STEER_CNT_NO_SNAT_PORT = 7,
	/* A non-SYN packet to the VIP with no conntrack entry: passed. */
	STEER_CNT_NO_FLOW = 8,
	STEER_CNT_CLOSED_FLOWS = 9,
	STEER_COUNTER_MAX = 10,
};

enum steer_event_kind {
	STEER_EVENT_FLOW_OPENED = 1,
	STEER_EVENT_FLOW_CLOSED = 2,
	STEER_EVENT_NO_BACKEND = 3,
	STEER_EVENT_NO_ROUTE = 4,
	STEER_EVENT_NO_SNAT_PORT = 5,
};

/* Key of the services map. */
struct steer_service_key {
	__u32 vip;
	__u16 port;
	__u8 proto;
	__u8 _pad;
};

struct steer_service {
	__u32 id;
	__u32 policy;		/* enum steer_policy */
	/* Backend slots 0..backend_count-1 are in use (holes are DOWN). */
	__u32 backend_count;
	/* Entries of the round-robin ring in use, 0 when nothing is active. */
	__u32 rr_len;
};

struct steer_backend {
	__u32 addr;
	__u16 port;
	__u16 _pad0;
	__u32 weight;
	__u32 state;		/* enum steer_backend_state */
	__u32 max_conns;	/* 0: no cap */
	__u32 kind;		/* enum steer_backend_kind */
	/* Bumped whenever the id is given to a new backend, so a flow of the
	 * previous owner never releases a count of the new one. */
	__u32 generation;
	/* Idle llama.cpp slots at the agent's last poll (policy slots). */
	__u32 idle_slots;
};

/* Element of the mmap-able connection count array, index backend id. The
 * kernel and the agent both change it with atomic operations. */
struct steer_backend_conns {
	__u64 active;
	/* New flows steered to the backend; the agent subtracts those its last
	 * slot poll already saw, so policy slots counts them as taken. */
	__u64 steered;
};

struct steer_backend_stats {
	__u64 packets;
	__u64 bytes;
	__u64 new_flows;
};

/* Conntrack key: the packet's own tuple as it arrives. */
struct steer_flow_key {
	__u32 src_addr;
	__u32 dst_addr;
	__u16 src_port;
	__u16 dst_port;
	__u8 proto;
	__u8 _pad[3];
};

/* Where a flow's packets leave: bpf_fib_lookup's answer, kept in the flow's
 * conntrack entry and looked up again about once a second, so route and
 * neighbour changes take effect without a lookup on every packet. An ifindex
 * of 0 means not looked up yet. */
struct steer_next_hop {
	__u32 ifindex;
	__u8 smac[6];
	__u8 dmac[6];
};

enum steer_flow_flags {
	/* The backend is on this host: destination NAT only, the stack delivers
	 * it, and the TC egress program undoes the NAT on the replies. */
	STEER_FLOW_LOCAL = 1,
};

/* How a flow's reply tuple may be reused after the first FIN or RST, and for
 * how long it stays held from the flow's last packet. */
enum steer_flow_close {
	STEER_FLOW_OPEN = 0,
	/* The client's FIN first, or a reset: held for closed_flow_ns. */
	STEER_FLOW_CLOSED = 1,
	/* A new flow is taking the tuple over. */
	STEER_FLOW_TAKEN = 2,
	/* The backend's FIN first: it keeps the tuple in TIME_WAIT, where a SYN
	 * from another client (older TCP timestamps) may be refused, so it is
	 * held for time_wait_ns. */
	STEER_FLOW_BACKEND_CLOSED = 3,
};

/* ct_fwd value, key client -> VIP. For a local flow the source stays the
 * client's own (snat_addr and snat_port hold it unchanged). */
struct steer_flow_fwd {
	__u32 backend_id;
	__u32 generation;
	__u32 backend_addr;
	__u32 snat_addr;
	__u16 backend_port;
	__u16 snat_port;
	/* Set once (atomically) when FIN or RST releases the backend's count. */
	__u32 released;
	__u32 flags;		/* enum steer_flow_flags */
	__u32 _pad;
	/* Also when the next hop was last looked up. */
	__u64 last_seen_ns;
	struct steer_next_hop hop;	/* towards the backend; unused for local flows */
};

/* ct_rev value, key backend -> SNAT address and port (remote backends), or
 * backend -> client (local backends, matched by the TC egress program). */
struct steer_flow_rev {
	__u32 client_addr;
	__u32 vip;
	__u16 client_port;
	__u16 vip_port;
	__u32 backend_id;
	/* Also when the next hop was last looked up. */
	__u64 last_seen_ns;
	struct steer_next_hop hop;	/* towards the client; found on the first reply */
	__u32 closed;		/* enum steer_flow_close */
	/* Host-order sequence number just past the client's FIN (0: none seen):
	 * a backend FIN that does not acknowledge it crossed it, and the backend
	 * keeps TIME_WAIT too. */
	__u32 client_fin_end;
};

struct steer_iface {
	/* IPv4 address used as the source towards backends behind it. */
	__u32 snat_addr;
	__u32 _pad;
};

struct steer_event {
	__u64 timestamp_ns;
	__u32 kind;		/* enum steer_event_kind */
	__u32 service_id;
	__u32 backend_id;
	__u32 client_addr;
	__u16 client_port;
	__u16 _pad0;
	__u32 _pad1;
};

/* The same sizes lb-common asserts; a mismatch fails the build on either side. */
_Static_assert(sizeof(struct steer_service_key) == 8, "steer_service_key");
_Static_assert(sizeof(struct steer_service) == 16, "steer_service");
_Static_assert(sizeof(struct steer_backend) == 32, "steer_backend");
_Static_assert(sizeof(struct steer_backend_conns) == 16, "steer_backend_conns");
_Static_assert(sizeof(struct steer_backend_stats) == 24, "steer_backend_stats");
_Static_assert(sizeof(struct steer_flow_key) == 16, "steer_flow_key");
_Static_assert(sizeof(struct steer_next_hop) == 16, "steer_next_hop");
_Static_assert(sizeof(struct steer_flow_fwd) == 56, "steer_flow_fwd");
_Static_assert(sizeof(struct steer_flow_rev) == 48, "steer_flow_rev");
_Static_assert(sizeof(struct steer_iface) == 8, "steer_iface");
_Static_assert(sizeof(struct steer_event) == 32, "steer_event");

#endif /* STEER_ABI_H */
