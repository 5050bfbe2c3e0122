/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Header parsing: one cursor, every bounds check done once, here. */
#ifndef STEER_PARSING_H
#define STEER_PARSING_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

enum { IP_FLAG_MORE_FRAGMENTS = 0x2000, IP_FRAGMENT_OFFSET = 0x1fff };

struct hdr_cursor {
	void *pos;
	void *end;
};

/* What the rest of the program reads: pointers valid up to data_end. */
struct packet {
	struct ethhdr *eth;
	struct iphdr *ip;
	struct tcphdr *tcp;
	__u32 len;		/* IP total length, for byte counters */
};

static __always_inline struct ethhdr *parse_ethhdr(struct hdr_cursor *c)
{
	struct ethhdr *eth = c->pos;

	if ((void *)(eth + 1) > c->end)
		return NULL;
	c->pos = eth + 1;
	return eth;
}

/* IPv4 without options and not a fragment. */
static __always_inline struct iphdr *parse_ipv4(struct hdr_cursor *c)
{
	struct iphdr *ip = c->pos;

	if ((void *)(ip + 1) > c->end)
		return NULL;
	if (ip->version != 4 || ip->ihl != 5)
		return NULL;
	if (ip->frag_off & bpf_htons(IP_FLAG_MORE_FRAGMENTS | IP_FRAGMENT_OFFSET))
		return NULL;
	c->pos = ip + 1;
	return ip;
}

static __always_inline struct tcphdr *parse_tcp(struct hdr_cursor *c, __u16 ip_payload)
{
	struct tcphdr *tcp = c->pos;

	if ((void *)(tcp + 1) > c->end)
		return NULL;
	if (tcp->doff < 5 || tcp->doff * 4 > ip_payload)
		return NULL;
	c->pos = tcp + 1;
	return tcp;
}

/* Fills pkt for an IPv4 TCP packet Steer may rewrite; anything else is -1.
 * XDP and TC entry points pass their context's data and data_end (the headers
 * must lie there) and the frame's whole length (an skb's payload may not). */
static __always_inline int parse_packet(void *data, void *data_end, __u32 frame_len,
					struct packet *pkt)
{
	struct hdr_cursor c = {
		.pos = data,
		.end = data_end,
	};

	pkt->eth = parse_ethhdr(&c);
	if (!pkt->eth || pkt->eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	pkt->ip = parse_ipv4(&c);
	if (!pkt->ip || pkt->ip->protocol != IPPROTO_TCP)
		return -1;
	pkt->len = bpf_ntohs(pkt->ip->tot_len);
	if (pkt->len < sizeof(struct iphdr) + sizeof(struct tcphdr))
		return -1;
	pkt->tcp = parse_tcp(&c, pkt->len - sizeof(struct iphdr));
	if (!pkt->tcp)
		return -1;
	/* Truncated: the IP header claims more than the frame holds. */
	if (sizeof(struct ethhdr) + pkt->len > frame_len)
		return -1;
	return 0;
}

static __always_inline int tcp_is_syn(const struct tcphdr *tcp)
{
	return tcp->syn && !tcp->ack && !tcp->rst && !tcp->fin;
}

static __always_inline int tcp_ends_flow(const struct tcphdr *tcp)
{
	return tcp->fin || tcp->rst;
}

/* The sequence number just past a FIN segment: its data and the FIN itself. */
static __always_inline __u32 tcp_fin_end(const struct packet *pkt)
{
	__u32 headers = pkt->ip->ihl * 4 + pkt->tcp->doff * 4;

	return bpf_ntohl(pkt->tcp->seq) + bpf_ntohs(pkt->ip->tot_len) - headers + 1;
}

#endif /* STEER_PARSING_H */
