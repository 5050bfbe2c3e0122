// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Steer's XDP load balancer: steers each new TCP connection to a service
 * (VIP:port) to a backend chosen by the service's policy, tracks the flow in
 * two LRU conntrack maps and rewrites both directions. Remote backends get
 * full NAT, forwarded with XDP_REDIRECT; local backends (on this host) get
 * destination NAT and XDP_PASS, and the TC egress program below undoes it on
 * their replies. Anything Steer does not handle is passed untouched.
 */
#include <linux/pkt_cls.h>

#include "clock.h"
#include "compiler.h"
#include "conntrack.h"
#include "counters.h"
#include "events.h"
#include "ids.h"
#include "nat.h"
#include "parsing.h"
#include "policy.h"

enum {
	STEER_HEADERS_LEN = sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct tcphdr),
};

/* Makes every shared enum and the event struct reach BTF, where a test
 * compares them with lb-common. Never read. */
const volatile struct steer_abi_anchor {
	enum steer_limits limits;
	enum steer_policy policy;
	enum steer_backend_state state;
	enum steer_backend_kind kind;
	enum steer_counter counter;
	enum steer_event_kind event_kind;
	enum steer_flow_flags flow_flags;
	enum steer_flow_close flow_close;
	struct steer_event event;
} steer_abi_anchor __attribute__((used));

/* Remote backend -> LB reply of a tracked flow: back to VIP -> client. -1: not ours. */
static __always_inline int handle_reply(struct xdp_md *ctx, struct packet *pkt)
{
	__u16 port = bpf_ntohs(pkt->tcp->dest);
	struct steer_flow_rev *rev;
	__u64 now;

	/* Replies come back to an SNAT port: anything else skips the lookup. */
	if (port < snat_port_min || port > snat_port_max)
		return -1;
	rev = reply_flow(pkt);
	if (!rev)
		return -1;
	now = coarse_now();
	if (refresh_due(&rev->last_seen_ns, now) || !rev->hop.ifindex) {
		if (next_hop(ctx, rev->vip, rev->client_addr, pkt->len, &rev->hop)) {
			count(backend_service_id(rev->backend_id), STEER_CNT_NO_ROUTE, 1);
			return XDP_PASS;
		}
		rev->last_seen_ns = now;
	}
	track_reply(pkt, rev);
	account_reply(rev->backend_id, pkt->len);
	rewrite(pkt, rev->vip, rev->vip_port, rev->client_addr, rev->client_port, &rev->hop);
	return bpf_redirect_map(&tx_ports, rev->hop.ifindex, 0);
}

/* Client -> VIP packet of a tracked flow: to its backend, next hop refreshed
 * about once a second. */
static __always_inline int forward_flow(struct xdp_md *ctx, struct packet *pkt,
					struct steer_flow_fwd *flow)
{
	int local = flow->flags & STEER_FLOW_LOCAL;
	__u64 now = coarse_now();

	if (refresh_due(&flow->last_seen_ns, now)) {
		if (!local &&
		    next_hop(ctx, flow->snat_addr, flow->backend_addr, pkt->len, &flow->hop)) {
			count(backend_service_id(flow->backend_id), STEER_CNT_NO_ROUTE, 1);
			return XDP_PASS;
		}
		flow->last_seen_ns = now;
	}
	track_forward(pkt, flow, now);
	account_forward(flow->backend_id, pkt->len, 0);
	if (local) {
		rewrite_tuple(pkt, flow->snat_addr, flow->snat_port, flow->backend_addr,
			      flow->backend_port);
		return XDP_PASS;
	}
	rewrite(pkt, flow->snat_addr, flow->snat_port, flow->backend_addr, flow->backend_port,
		&flow->hop);
	return bpf_redirect_map(&tx_ports, flow->hop.ifindex, 0);
}

static __always_inline int refuse_new_flow(const struct packet *pkt, __u32 service_id,
					   __u32 backend_id, enum steer_counter counter,
					   enum steer_event_kind event)
{
	count(service_id, counter, 1);
	emit_event(event, service_id, backend_id, pkt->ip->saddr, pkt->tcp->source);
	return XDP_PASS;
}

/* A SYN with no flow: choose a backend, claim its capacity and the reply
 * tuple, record the flow both ways, then rewrite. Any failure passes the SYN
 * on. A local backend (no route) keeps the client's source; a remote one gets
 * the egress interface's address and a free port. */
static __always_inline int new_flow(struct xdp_md *ctx, struct packet *pkt,
				    const struct steer_service *svc,
				    const struct steer_flow_key *key)
{
	const struct backend_route *route = NULL;
	__u64 now = coarse_now();
	struct steer_flow_rev rev = {};
	struct steer_flow_fwd flow = {};
	struct steer_backend *b;
	__u32 id = 0;
	int claimed;

	if (pick_backend(svc, key->src_addr, &id))
		return refuse_new_flow(pkt, svc->id, 0, STEER_CNT_NO_BACKEND, STEER_EVENT_NO_BACKEND);
	b = bpf_map_lookup_elem(&backends, &id);
	if (!b)
		return XDP_PASS;
	if (b->kind != STEER_BACKEND_LOCAL) {
		route = backend_route(ctx, id, b, pkt->len, now);
		if (!route)
			return refuse_new_flow(pkt, svc->id, id, STEER_CNT_NO_ROUTE,
					       STEER_EVENT_NO_ROUTE);
	}
	if (claim_connection(b, id))
		return refuse_new_flow(pkt, svc->id, id, STEER_CNT_NO_BACKEND, STEER_EVENT_NO_BACKEND);

	rev.client_addr = key->src_addr;
	rev.vip = key->dst_addr;
	rev.client_port = key->src_port;
	rev.vip_port = key->dst_port;
	rev.backend_id = id;
	rev.last_seen_ns = now;
	if (!route) {	/* local */
		flow.snat_addr = key->src_addr;
		flow.snat_port = key->src_port;
		flow.flags = STEER_FLOW_LOCAL;
		claimed = claim_reply_tuple(b->addr, b->port, flow.snat_addr, flow.snat_port, &rev);
	} else {
		flow.hop = route->hop;
		flow.snat_addr = route->snat_addr;
		claimed = claim_snat_port(id, b->addr, b->port, flow.snat_addr, &rev,
					  &flow.snat_port);
	}
	if (claimed) {
		return_connection(id);
		return refuse_new_flow(pkt, svc->id, id, STEER_CNT_NO_SNAT_PORT,
				       STEER_EVENT_NO_SNAT_PORT);
	}

	flow.backend_id = id;
	flow.generation = b->generation;
	flow.backend_addr = b->addr;
	flow.backend_port = b->port;
	flow.last_seen_ns = rev.last_seen_ns;
	if (record_flow(key, &flow))
		return refuse_new_flow(pkt, svc->id, id, STEER_CNT_NO_SNAT_PORT,
				       STEER_EVENT_NO_SNAT_PORT);

	count(svc->id, STEER_CNT_NEW_FLOWS, 1);
	account_forward(id, pkt->len, 1);
	if (flow_events)
		emit_event(STEER_EVENT_FLOW_OPENED, svc->id, id, key->src_addr, key->src_port);
	if (!route) {
		rewrite_tuple(pkt, flow.snat_addr, flow.snat_port, flow.backend_addr,
			      flow.backend_port);
		return XDP_PASS;
	}
	rewrite(pkt, flow.snat_addr, flow.snat_port, flow.backend_addr, flow.backend_port,
		&flow.hop);
	return bpf_redirect_map(&tx_ports, flow.hop.ifindex, 0);
}

/* Whether daddr may be a VIP (filter slots are shared, so this can be wrong
 * only the safe way). */
static __always_inline int maybe_vip(__be32 daddr)
{
	__u32 slot = client_hash(daddr) % STEER_VIP_FILTER_SIZE;
	__u32 *services = bpf_map_lookup_elem(&vip_filter, &slot);

	return services && *services;
}

/* Whether the flow's service still serves the packet's VIP:port. */
static __always_inline int service_serves(const struct steer_flow_fwd *flow,
					  const struct packet *pkt)
{
	__u32 id = backend_service_id(flow->backend_id);
	struct steer_service_key *served = bpf_map_lookup_elem(&service_keys, &id);

	return served && served->vip == pkt->ip->daddr && served->port == pkt->tcp->dest;
}

/* Client -> VIP: a tracked flow is forwarded, a SYN opens one. -1: no
 * service has this VIP:port. */
static __always_inline int handle_vip(struct xdp_md *ctx, struct packet *pkt)
{
	struct steer_service_key service_key;
	struct steer_flow_key key;
	struct steer_service *svc;
	struct steer_flow_fwd *flow;

	flow = client_flow(pkt, &key);
	if (flow && service_serves(flow, pkt))
		return forward_flow(ctx, pkt, flow);

	__builtin_memset(&service_key, 0, sizeof(service_key));
	service_key.vip = pkt->ip->daddr;
	service_key.port = pkt->tcp->dest;
	service_key.proto = IPPROTO_TCP;
	svc = bpf_map_lookup_elem(&services, &service_key);
	if (!svc)
		return -1;
	if (!tcp_is_syn(pkt->tcp)) {
		count(svc->id, STEER_CNT_NO_FLOW, 1);
		return XDP_PASS;
	}
	return new_flow(ctx, pkt, svc, &key);
}

SEC("xdp")
int steer_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	struct packet pkt;
	int verdict = -1;

	if (parse_packet(data, data_end, data_end - data, &pkt))
		return XDP_PASS;
	if (maybe_vip(pkt.ip->daddr))
		verdict = handle_vip(ctx, &pkt);
	if (verdict < 0)
		verdict = handle_reply(ctx, &pkt);
	return verdict < 0 ? XDP_PASS : verdict;
}

/* Replies of local backends leave through the stack: set their source back
 * to the VIP. Everything else goes out untouched. */
SEC("classifier")
int steer_tc_egress(struct __sk_buff *skb)
{
	struct steer_flow_rev *rev;
	struct packet pkt;
	__u64 now;

	/* Locally sent packets may carry headers outside the linear part. */
	if ((void *)(long)skb->data + STEER_HEADERS_LEN > (void *)(long)skb->data_end &&
	    bpf_skb_pull_data(skb, STEER_HEADERS_LEN))
		return TC_ACT_OK;
	if (parse_packet((void *)(long)skb->data, (void *)(long)skb->data_end, skb->len, &pkt))
		return TC_ACT_OK;
	rev = reply_flow(&pkt);
	if (!rev)
		return TC_ACT_OK;
	now = coarse_now();
	if (refresh_due(&rev->last_seen_ns, now))
		rev->last_seen_ns = now;
	track_reply(&pkt, rev);
	account_reply(rev->backend_id, pkt.len);
	/* The helpers below may move the data: pkt is not read after them. */
	rewrite_source_skb(skb, &pkt, rev->vip, rev->vip_port);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
