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

static __always_inline void account(__u32 backend_id, enum steer_counter packets,
				    __u32 bytes, __u32 new_flows)
{
	__u32 service_id = backend_service_id(backend_id);

	count(service_id, packets, 1);
	count(service_id, packets + 1, bytes);	/* the _BYTES counter follows */
	count_backend(backend_id, bytes, new_flows);
}

#endif /* STEER_COUNTERS_H */
