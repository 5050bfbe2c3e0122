/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* The program's clock, and how stale a timestamp it keeps may grow. */
#ifndef STEER_CLOCK_H
#define STEER_CLOCK_H

#include "compiler.h"
#include "maps.h"

enum {
	/* How long a cached next hop and a flow's last_seen stand before they
	 * are refreshed: route and neighbour changes take effect within it. */
	STEER_REFRESH_NS = 1000000000,
};

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

/* Whether a timestamp shared between CPUs is older than STEER_REFRESH_NS: a
 * flow's last_seen is written about once a second, not on every packet
 * (sparing the shared cache line), and so is its cached next hop. */
static __always_inline int refresh_due(const __u64 *stamp_ns, __u64 now)
{
	return now - READ_ONCE(*stamp_ns) > STEER_REFRESH_NS;
}

#endif /* STEER_CLOCK_H */
