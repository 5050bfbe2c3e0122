/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Per-service and per-backend counters: per-CPU arrays, so plain adds. */
#ifndef STEER_COUNTERS_H
#define STEER_COUNTERS_H

#include "ids.h"
#include "maps.h"

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

/* One packet of a flow: its direction's packet and byte counters of the
 * service, and the backend's counters. */
static __always_inline void account(__u32 backend_id, enum steer_counter packets,
				    enum steer_counter bytes_counter, __u32 bytes,
				    __u32 new_flows)
{
	__u32 service_id = backend_service_id(backend_id);

	count(service_id, packets, 1);
	count(service_id, bytes_counter, bytes);
	count_backend(backend_id, bytes, new_flows);
}

/* Client -> backend; new_flows is 1 on the packet that opened the flow. */
static __always_inline void account_forward(__u32 backend_id, __u32 bytes, __u32 new_flows)
{
	account(backend_id, STEER_CNT_FWD_PACKETS, STEER_CNT_FWD_BYTES, bytes, new_flows);
}

/* Backend -> client. */
static __always_inline void account_reply(__u32 backend_id, __u32 bytes)
{
	account(backend_id, STEER_CNT_REPLY_PACKETS, STEER_CNT_REPLY_BYTES, bytes, 0);
}

#endif /* STEER_COUNTERS_H */
