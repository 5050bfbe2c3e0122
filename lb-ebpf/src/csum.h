/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
 * One's complement sums do not depend on byte order, so every value is used
 * as it sits in the packet. */
#ifndef STEER_CSUM_H
#define STEER_CSUM_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>	/* __always_inline that inlines (linux/stddef.h's only hints) */

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

static __always_inline void csum_replace4(__sum16 *sum, __be32 from, __be32 to)
{
	__u32 s = (__u16)~*sum;

	s += (__u16)~(from & 0xffff);
	s += (__u16)~(from >> 16);
	s += to & 0xffff;
	s += to >> 16;
	*sum = (__u16)~csum_fold(s);
}

static __always_inline void csum_replace2(__sum16 *sum, __be16 from, __be16 to)
{
	__u32 s = (__u16)~*sum;

	s += (__u16)~from;
	s += to;
	*sum = (__u16)~csum_fold(s);
}

#endif /* STEER_CSUM_H */
