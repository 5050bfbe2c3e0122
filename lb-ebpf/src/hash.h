/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* The address hash the kernel and the agent compute alike. */
#ifndef STEER_HASH_H
#define STEER_HASH_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>	/* __always_inline that inlines (linux/stddef.h's only hints) */

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

#endif /* STEER_HASH_H */
