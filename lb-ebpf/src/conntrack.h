/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Connection tracking: the life of a flow's two entries, ct_fwd (client ->
 * VIP, to the backend) and ct_rev (backend -> SNAT tuple, back to the client).
 *
 * Open: a SYN claims a connection of the backend's cap (claim_connection) and
 * a reply tuple no live flow has (claim_reply_tuple), then records the flow
 * (record_flow); nat.h picks the SNAT port whose tuple is free.
 * Close: the first FIN or RST, from either side, gives the connection back
 * once (flow_closed) and marks the reply tuple closed (track_forward,
 * track_reply). From the flow's last packet the tuple stays held for
 * closed_flow_ns, or time_wait_ns when the backend closed first and keeps
 * TIME_WAIT. After the hold the agent's expiry deletes both entries (it also
 * ends flows idle too long), unless a new flow took the tuple over first
 * (reclaim_reply_tuple); a new SYN on the client's tuple drops the old ct_fwd
 * entry at once (client_flow).
 */
#ifndef STEER_CONNTRACK_H
#define STEER_CONNTRACK_H

#include "compiler.h"
#include "counters.h"
#include "events.h"
#include "ids.h"
#include "maps.h"
#include "parsing.h"

/* How long a closed flow keeps its reply tuple after its last packet, so late
 * packets of the close never reach a new flow (the agent's closed-flow
 * timeout, after which its expiry deletes the entries). */
const volatile __u64 closed_flow_ns = 10000000000ULL;
/* How long a tuple the backend closed first stays held: Linux's TIME_WAIT
 * (60 s, fixed) and the coarse clock's refresh of last_seen_ns. */
const volatile __u64 time_wait_ns = 62000000000ULL;

static __always_inline void flow_key_of(struct steer_flow_key *key, __be32 saddr, __be32 daddr,
				       __be16 sport, __be16 dport)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->src_addr = saddr;
	key->dst_addr = daddr;
	key->src_port = sport;
	key->dst_port = dport;
	key->proto = IPPROTO_TCP;
}

/* Take one connection of the backend's cap; fails when another CPU took the last. */
static __always_inline int claim_active(struct steer_backend_conns *c, __u32 max_conns)
{
	int i;

	if (max_conns == 0) {
		__sync_fetch_and_add(&c->active, 1);
		return 0;
	}
	for (i = 0; i < 8; i++) {
		__u64 cur = READ_ONCE(c->active);

		if (cur >= max_conns)
			return -1;
		if (__sync_val_compare_and_swap(&c->active, cur, cur + 1) == cur)
			return 0;
	}
	return -1;
}

/* A claimed connection also counts as steered (policy slots reads it). */
static __always_inline int claim_connection(const struct steer_backend *b, __u32 id)
{
	struct steer_backend_conns *c = bpf_map_lookup_elem(&backend_conns, &id);

	if (!c || claim_active(c, b->max_conns))
		return -1;
	__sync_fetch_and_add(&c->steered, 1);
	return 0;
}

static __always_inline void return_connection(__u32 id)
{
	struct steer_backend_conns *c = bpf_map_lookup_elem(&backend_conns, &id);

	if (c)
		__sync_fetch_and_sub(&c->active, 1);
}

/* Give the flow's connection back, once, and only to the backend it counted on. */
static __always_inline int release_flow(struct steer_flow_fwd *flow)
{
	struct steer_backend *b;
	__u32 id = flow->backend_id;

	if (__sync_val_compare_and_swap(&flow->released, 0, 1) != 0)
		return 0;
	b = bpf_map_lookup_elem(&backends, &id);
	if (b && b->generation == flow->generation)
		return_connection(id);
	return 1;
}

/* Take over old, the reply tuple of a flow closed and quiet for its hold
 * (closed_flow_ns, or time_wait_ns when the backend closed first), as the
 * agent's expiry would free it, without waiting for its sweep. The
 * compare-and-swap lets one CPU alone take it. */
static __always_inline int reclaim_reply_tuple(const struct steer_flow_key *key,
					       struct steer_flow_rev *old,
					       const struct steer_flow_rev *rev)
{
	__u32 closed = READ_ONCE(old->closed);
	__u64 hold;

	if (closed == STEER_FLOW_CLOSED)
		hold = closed_flow_ns;
	else if (closed == STEER_FLOW_BACKEND_CLOSED)
		hold = time_wait_ns;
	else
		return -1;
	/* Signed: another CPU's clock read may be a tick ahead of ours. */
	if ((__s64)(rev->last_seen_ns - READ_ONCE(old->last_seen_ns)) <= (__s64)hold)
		return -1;
	if (__sync_val_compare_and_swap(&old->closed, closed, STEER_FLOW_TAKEN) != closed)
		return -1;
	return bpf_map_update_elem(&ct_rev, key, rev, BPF_EXIST);
}

/* Record the reply tuple backend -> addr:port, unless a live flow has it: the
 * BPF_NOEXIST insert (or the takeover of a closed flow's) is the claim, so two
 * flows never share a tuple. A lookup first: a taken tuple costs no insert. */
static __always_inline int claim_reply_tuple(__be32 backend_addr, __be16 backend_port,
					     __be32 addr, __be16 port,
					     const struct steer_flow_rev *rev)
{
	struct steer_flow_key key;
	struct steer_flow_rev *old;

	flow_key_of(&key, backend_addr, addr, backend_port, port);
	old = bpf_map_lookup_elem(&ct_rev, &key);
	if (!old)
		return bpf_map_update_elem(&ct_rev, &key, rev, BPF_NOEXIST);
	return reclaim_reply_tuple(&key, old, rev);
}

/* The tracked flow of a client -> VIP packet, NULL when none; key is set to
 * the packet's tuple. A SYN on a closed flow's tuple is a new connection
 * reusing it: the old entry is deleted so that it cannot catch the new
 * flow's packets if the SYN goes to the stack. The old reply tuple keeps its
 * own entry (and hold) in ct_rev. */
static __always_inline struct steer_flow_fwd *client_flow(const struct packet *pkt,
							  struct steer_flow_key *key)
{
	struct steer_flow_fwd *flow;

	flow_key_of(key, pkt->ip->saddr, pkt->ip->daddr, pkt->tcp->source, pkt->tcp->dest);
	flow = bpf_map_lookup_elem(&ct_fwd, key);
	if (flow && READ_ONCE(flow->released) && tcp_is_syn(pkt->tcp)) {
		bpf_map_delete_elem(&ct_fwd, key);
		return NULL;
	}
	return flow;
}

/* Record a new flow whose connection and reply tuple are claimed; when that
 * fails, give both back. */
static __always_inline int record_flow(const struct steer_flow_key *key,
				       const struct steer_flow_fwd *flow)
{
	struct steer_flow_key rev_key;

	if (!bpf_map_update_elem(&ct_fwd, key, flow, BPF_ANY))
		return 0;
	flow_key_of(&rev_key, flow->backend_addr, flow->snat_addr, flow->backend_port,
		    flow->snat_port);
	bpf_map_delete_elem(&ct_rev, &rev_key);
	return_connection(flow->backend_id);
	return -1;
}

/* The flow's first FIN or RST, from either side: its connection goes back
 * (once), and the close is counted and told to the agent. */
static __always_inline void flow_closed(struct steer_flow_fwd *flow, __be32 client_addr,
					__be16 client_port)
{
	if (!release_flow(flow))
		return;
	count(backend_service_id(flow->backend_id), STEER_CNT_CLOSED_FLOWS, 1);
	if (flow_events)
		emit_event(STEER_EVENT_FLOW_CLOSED, backend_service_id(flow->backend_id),
			   flow->backend_id, client_addr, client_port);
}

/* A packet of a closing flow: mark its reply tuple closed and keep it held
 * while packets come, unless a new flow has taken it already. */
static __always_inline void hold_closed_tuple(const struct steer_flow_fwd *flow,
					      const struct packet *pkt, __u64 now)
{
	struct steer_flow_key key;
	struct steer_flow_rev *rev;

	flow_key_of(&key, flow->backend_addr, flow->snat_addr, flow->backend_port,
		    flow->snat_port);
	rev = bpf_map_lookup_elem(&ct_rev, &key);
	if (!rev || rev->client_addr != pkt->ip->saddr || rev->client_port != pkt->tcp->source ||
	    rev->vip != pkt->ip->daddr || rev->vip_port != pkt->tcp->dest)
		return;
	if (READ_ONCE(rev->closed) == STEER_FLOW_OPEN) {
		rev->closed = STEER_FLOW_CLOSED;
		if (pkt->tcp->fin)
			rev->client_fin_end = tcp_fin_end(pkt);
	}
	rev->last_seen_ns = now;
}

/* A client packet of a tracked flow: its first FIN or RST closes the flow;
 * from then on each packet keeps the reply tuple held. */
static __always_inline void track_forward(const struct packet *pkt, struct steer_flow_fwd *flow,
					  __u64 now)
{
	if (tcp_ends_flow(pkt->tcp))
		flow_closed(flow, pkt->ip->saddr, pkt->tcp->source);
	if (READ_ONCE(flow->released))
		hold_closed_tuple(flow, pkt, now);
}

/* A backend FIN after the client's that does not acknowledge it: the FINs
 * crossed (simultaneous close) and the backend keeps TIME_WAIT as well. */
static __always_inline int fins_crossed(const struct tcphdr *tcp, const struct steer_flow_rev *rev)
{
	__u32 client_fin_end = READ_ONCE(rev->client_fin_end);

	if (!tcp->fin || !client_fin_end)
		return 0;
	return !tcp->ack || (__s32)(bpf_ntohl(tcp->ack_seq) - client_fin_end) < 0;
}

/* The tracked flow a backend's packet answers, NULL when none: its tuple is
 * the flow's reply tuple (backend -> SNAT address and port, or -> client for
 * a local backend). */
static __always_inline struct steer_flow_rev *reply_flow(const struct packet *pkt)
{
	struct steer_flow_key key;

	flow_key_of(&key, pkt->ip->saddr, pkt->ip->daddr, pkt->tcp->source, pkt->tcp->dest);
	return bpf_map_lookup_elem(&ct_rev, &key);
}

/* A backend packet of a tracked flow, local or remote: its FIN or RST marks
 * the reply tuple closed and closes the flow it answers, if that flow is
 * still the tuple's. The side that closes first keeps TIME_WAIT; both do
 * when the FINs cross. */
static __always_inline void track_reply(const struct packet *pkt, struct steer_flow_rev *rev)
{
	struct steer_flow_key key;
	struct steer_flow_fwd *flow;
	__u32 closed;

	if (!tcp_ends_flow(pkt->tcp))
		return;
	closed = READ_ONCE(rev->closed);
	if (closed == STEER_FLOW_OPEN)
		rev->closed = pkt->tcp->rst ? STEER_FLOW_CLOSED : STEER_FLOW_BACKEND_CLOSED;
	else if (closed == STEER_FLOW_CLOSED && fins_crossed(pkt->tcp, rev))
		__sync_val_compare_and_swap(&rev->closed, STEER_FLOW_CLOSED,
					    STEER_FLOW_BACKEND_CLOSED);
	flow_key_of(&key, rev->client_addr, rev->vip, rev->client_port, rev->vip_port);
	flow = bpf_map_lookup_elem(&ct_fwd, &key);
	if (flow && flow->backend_id == rev->backend_id)
		flow_closed(flow, rev->client_addr, rev->client_port);
}

#endif /* STEER_CONNTRACK_H */
