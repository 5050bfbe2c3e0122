/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Events to the agent through the events ring buffer, and when it is woken. */
#ifndef STEER_EVENTS_H
#define STEER_EVENTS_H

#include "maps.h"

enum {
	/* The reader is woken only once this much waits (see events_wakeup). */
	STEER_EVENTS_WAKEUP_BYTES = STEER_EVENTS_BYTES / 4,
};

/* Flow opened/closed events; the agent may turn them off to save the cost.
 * Refusals are always sent. */
const volatile __u32 flow_events = 1;

/* A wakeup is an interrupt to another CPU (a VM exit under a hypervisor),
 * too dear for every new flow: the agent drains the ring on a short timer,
 * and the record that makes the waiting data cross a quarter of the ring
 * (the reserved one included) wakes it early, once per crossing. */
static __always_inline __u64 events_wakeup(void)
{
	const __u64 record = (BPF_RINGBUF_HDR_SZ + sizeof(struct steer_event) + 7) & ~7ULL;
	__u64 waiting = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);

	if (waiting >= STEER_EVENTS_WAKEUP_BYTES && waiting < STEER_EVENTS_WAKEUP_BYTES + record)
		return BPF_RB_FORCE_WAKEUP;
	return BPF_RB_NO_WAKEUP;
}

static __always_inline void emit_event(enum steer_event_kind kind, __u32 service_id,
				       __u32 backend_id, __u32 client_addr, __u16 client_port)
{
	struct steer_event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);

	if (!ev)
		return;
	ev->timestamp_ns = bpf_ktime_get_ns();
	ev->kind = kind;
	ev->service_id = service_id;
	ev->backend_id = backend_id;
	ev->client_addr = client_addr;
	ev->client_port = client_port;
	ev->_pad0 = 0;
	ev->_pad1 = 0;
	bpf_ringbuf_submit(ev, events_wakeup());
}

#endif /* STEER_EVENTS_H */
