/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Next hop, source-port allocation and the packet rewrites of full NAT. */
#ifndef STEER_NAT_H
#define STEER_NAT_H

#include "clock.h"
#include "compiler.h"
#include "conntrack.h"
#include "csum.h"
#include "maps.h"
#include "parsing.h"

enum {
	STEER_AF_INET = 2,
	/* Routes are looked up as if the packet came from loopback: the kernel
	 * refuses a lookup for an interface with forwarding off, and Steer must
	 * work with forwarding off on the interfaces it serves. lo forwards
	 * nothing of theirs (the agent turns on its forwarding flag alone). */
	STEER_FIB_IFINDEX = 1,
	/* Ports tried from a backend's cursor on (a taken one costs a lookup). */
	STEER_SNAT_PORT_TRIES = 64,
};

/* Source ports for flows to remote backends: [snat_port_min, snat_port_max]. */
const volatile __u16 snat_port_min = 16384;
const volatile __u16 snat_port_max = 32767;

/* Route dst; only interfaces in tx_ports can be the way out. hop is written
 * only on success, so a flow's cached hop stays whole when a lookup fails. */
static __always_inline int next_hop(struct xdp_md *ctx, __be32 src, __be32 dst, __u16 tot_len,
				    struct steer_next_hop *hop)
{
	struct bpf_fib_lookup fib;

	__builtin_memset(&fib, 0, sizeof(fib));
	fib.family = STEER_AF_INET;
	fib.l4_protocol = IPPROTO_TCP;
	fib.tot_len = tot_len;
	fib.ipv4_src = src;
	fib.ipv4_dst = dst;
	fib.ifindex = STEER_FIB_IFINDEX;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return -1;
	if (!bpf_map_lookup_elem(&tx_ports, &fib.ifindex))
		return -1;
	hop->ifindex = fib.ifindex;
	__builtin_memcpy(hop->smac, fib.smac, ETH_ALEN);
	__builtin_memcpy(hop->dmac, fib.dmac, ETH_ALEN);
	return 0;
}

/* The route to a remote backend for a new flow: the cached one when it is
 * fresh and for the backend's address, else looked up (by destination alone:
 * it serves every client) and cached. NULL: no way there. */
static __always_inline const struct backend_route *
backend_route(struct xdp_md *ctx, __u32 id, const struct steer_backend *b, __u16 tot_len,
	      __u64 now)
{
	struct backend_route *route = bpf_map_lookup_elem(&backend_routes, &id);
	struct steer_next_hop hop;
	struct steer_iface *iface;

	if (!route)
		return NULL;
	if (READ_ONCE(route->addr) == b->addr && !refresh_due(&route->checked_ns, now))
		return route;
	if (next_hop(ctx, 0, b->addr, tot_len, &hop))
		return NULL;
	iface = bpf_map_lookup_elem(&ifaces, &hop.ifindex);
	if (!iface)
		return NULL;
	route->hop = hop;
	route->snat_addr = iface->snat_addr;
	/* The address after what it names: another CPU that sees the new
	 * address reads the route found for it (x86 keeps stores in order). */
	asm volatile("" ::: "memory");
	route->addr = b->addr;
	route->checked_ns = now;
	return route;
}

/* Claim a source port towards a remote backend whose reply tuple is free,
 * the first one from the backend's cursor on. */
static __always_inline int claim_snat_port(__u32 backend_id, __be32 backend_addr,
					   __be16 backend_port, __be32 snat_addr,
					   const struct steer_flow_rev *rev, __be16 *snat_port)
{
	__u32 range = (__u32)snat_port_max - snat_port_min + 1;
	__u32 *cursor = bpf_map_lookup_elem(&snat_cursor, &backend_id);
	__u32 start, i;

	if (!cursor || snat_port_max < snat_port_min)
		return -1;
	start = READ_ONCE(*cursor);
	for (i = 0; i < STEER_SNAT_PORT_TRIES; i++) {
		__be16 port = bpf_htons(snat_port_min + (start + i) % range);

		if (claim_reply_tuple(backend_addr, backend_port, snat_addr, port, rev) == 0) {
			__sync_fetch_and_add(cursor, i + 1);
			*snat_port = port;
			return 0;
		}
	}
	__sync_fetch_and_add(cursor, STEER_SNAT_PORT_TRIES);
	return -1;
}

/* Rewrite addresses and ports in place (XDP), keeping both checksums valid. */
static __always_inline void rewrite_tuple(struct packet *pkt, __be32 saddr, __be16 sport,
					  __be32 daddr, __be16 dport)
{
	struct iphdr *ip = pkt->ip;
	struct tcphdr *tcp = pkt->tcp;

	csum_replace4(&ip->check, ip->saddr, saddr);
	csum_replace4(&ip->check, ip->daddr, daddr);
	csum_replace4(&tcp->check, ip->saddr, saddr);
	csum_replace4(&tcp->check, ip->daddr, daddr);
	csum_replace2(&tcp->check, tcp->source, sport);
	csum_replace2(&tcp->check, tcp->dest, dport);
	ip->saddr = saddr;
	ip->daddr = daddr;
	tcp->source = sport;
	tcp->dest = dport;
}

/* Full NAT towards the next hop. */
static __always_inline void rewrite(struct packet *pkt, __be32 saddr, __be16 sport, __be32 daddr,
				    __be16 dport, const struct steer_next_hop *hop)
{
	rewrite_tuple(pkt, saddr, sport, daddr, dport);
	__builtin_memcpy(pkt->eth->h_source, hop->smac, ETH_ALEN);
	__builtin_memcpy(pkt->eth->h_dest, hop->dmac, ETH_ALEN);
}

/* TC egress: set the source of a local backend's reply back to the VIP. The
 * skb helpers also cope with the partial checksums of locally sent packets. */
static __always_inline int rewrite_source_skb(struct __sk_buff *skb, const struct packet *pkt,
					      __be32 saddr, __be16 sport)
{
	__u32 ip_off = (void *)pkt->ip - (void *)(long)skb->data;
	__u32 tcp_off = ip_off + sizeof(struct iphdr);
	__be32 old_saddr = pkt->ip->saddr;
	__be16 old_sport = pkt->tcp->source;

	if (bpf_l4_csum_replace(skb, tcp_off + __builtin_offsetof(struct tcphdr, check), old_saddr, saddr,
				BPF_F_PSEUDO_HDR | sizeof(saddr)) ||
	    bpf_l4_csum_replace(skb, tcp_off + __builtin_offsetof(struct tcphdr, check), old_sport, sport,
				sizeof(sport)) ||
	    bpf_l3_csum_replace(skb, ip_off + __builtin_offsetof(struct iphdr, check), old_saddr, saddr,
				sizeof(saddr)) ||
	    bpf_skb_store_bytes(skb, ip_off + __builtin_offsetof(struct iphdr, saddr), &saddr,
				sizeof(saddr), 0) ||
	    bpf_skb_store_bytes(skb, tcp_off + __builtin_offsetof(struct tcphdr, source), &sport,
				sizeof(sport), 0))
		return -1;
	return 0;
}

#endif /* STEER_NAT_H */
