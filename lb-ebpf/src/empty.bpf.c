// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/* The benchmark's baseline: an XDP program that passes every packet. Its cost
 * per run, measured beside steer_xdp, is what running any program costs. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int empty_xdp(struct xdp_md *ctx)
{
	(void)ctx;
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
