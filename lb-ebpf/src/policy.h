/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Backend choice for a new flow. lb-userspace's policy module is the model of
 * these functions: the same map state must give the same choice. */
#ifndef STEER_POLICY_H
#define STEER_POLICY_H

#include "compiler.h"
#include "hash.h"
#include "ids.h"
#include "maps.h"

/* Conntrack hits a draining backend; a new flow needs an active one with room. */
static __always_inline int backend_has_room(const struct steer_backend *b, __u32 id, __u64 *conns)
{
	struct steer_backend_conns *c = bpf_map_lookup_elem(&backend_conns, &id);

	if (!c || b->state != STEER_BACKEND_ACTIVE || b->weight == 0)
		return 0;
	*conns = READ_ONCE(c->active);
	return b->max_conns == 0 || *conns < b->max_conns;
}

enum table_entry { ENTRY_TAKEN, ENTRY_FULL, ENTRY_INVALID };

/* One entry of a ring or lookup table names a backend slot of the service:
 * take it if that backend has room. An invalid entry ends the walk. */
static __always_inline enum table_entry try_entry(const struct steer_service *svc,
						  const __u32 *slot, __u32 *backend_id)
{
	struct steer_backend *b;
	__u64 conns;
	__u32 id;

	if (!slot || *slot >= STEER_MAX_BACKENDS_PER_SERVICE)
		return ENTRY_INVALID;
	id = backend_id_of(svc->id, *slot);
	b = bpf_map_lookup_elem(&backends, &id);
	if (!b || !backend_has_room(b, id, &conns))
		return ENTRY_FULL;
	*backend_id = id;
	return ENTRY_TAKEN;
}

/* Walk the service's weighted ring from a shared cursor; skip backends without room. */
static __always_inline int pick_round_robin(const struct steer_service *svc, __u32 *backend_id)
{
	__u32 key = svc->id, len = svc->rr_len, i;
	__u64 *cursor, start;

	if (len == 0 || len > STEER_RR_RING_SIZE)
		return -1;
	cursor = bpf_map_lookup_elem(&rr_cursor, &key);
	if (!cursor)
		return -1;
	start = __sync_fetch_and_add(cursor, 1);
	for (i = 0; i < STEER_RR_RING_SIZE && i < len; i++) {
		__u32 pos = svc->id * STEER_RR_RING_SIZE + (__u32)((start + i) % len);
		enum table_entry entry;

		entry = try_entry(svc, bpf_map_lookup_elem(&rr_ring, &pos), backend_id);

		if (entry != ENTRY_FULL)
			return entry == ENTRY_TAKEN ? 0 : -1;
	}
	return -1;
}

/* Fewest connections per unit of weight; ties go to the lowest slot. */
static __always_inline int pick_least_connections(const struct steer_service *svc,
						  __u32 *backend_id)
{
	__u64 best_conns = 0, best_weight = 0, conns;
	__u32 slot;
	int found = -1;

	for (slot = 0; slot < STEER_MAX_BACKENDS_PER_SERVICE && slot < svc->backend_count; slot++) {
		__u32 id = backend_id_of(svc->id, slot);
		struct steer_backend *b = bpf_map_lookup_elem(&backends, &id);

		if (!b || !backend_has_room(b, id, &conns))
			continue;
		if (found < 0 || conns * best_weight < best_conns * b->weight) {
			best_conns = conns;
			best_weight = b->weight;
			*backend_id = id;
			found = 0;
		}
	}
	return found;
}

/* Idle slots at the agent's last poll less the flows steered since, so a
 * burst between two polls spreads instead of piling onto one backend. */
static __always_inline __u64 free_slots(const struct steer_backend *b, __u32 id)
{
	struct steer_backend_conns *c = bpf_map_lookup_elem(&backend_conns, &id);
	__u64 steered;

	if (!c)
		return 0;
	steered = READ_ONCE(c->steered);
	return steered < b->idle_slots ? b->idle_slots - steered : 0;
}

/* Most free slots; ties go to fewer active connections, then the lowest slot.
 * Only backends with a cap (their slot count): one never polled has no room. */
static __always_inline int pick_slots(const struct steer_service *svc, __u32 *backend_id)
{
	__u64 best_free = 0, best_conns = 0, conns, free;
	__u32 slot;
	int found = -1;

	for (slot = 0; slot < STEER_MAX_BACKENDS_PER_SERVICE && slot < svc->backend_count; slot++) {
		__u32 id = backend_id_of(svc->id, slot);
		struct steer_backend *b = bpf_map_lookup_elem(&backends, &id);

		/* A cap of 0 is no room here: the agent writes the slot
		 * count once a poll knows it (never polled: not ready). */
		if (!b || b->max_conns == 0 || !backend_has_room(b, id, &conns))
			continue;
		free = free_slots(b, id);
		if (found < 0 || free > best_free || (free == best_free && conns < best_conns)) {
			best_free = free;
			best_conns = conns;
			*backend_id = id;
			found = 0;
		}
	}
	return found;
}

/* The client address picks an entry of the service's Maglev table; when that
 * backend has no room, the next entries are tried (a bounded few). */
static __always_inline int pick_maglev(const struct steer_service *svc, __be32 client_addr,
				       __u32 *backend_id)
{
	__u32 start = client_hash(client_addr) % STEER_MAGLEV_SIZE, i;

	for (i = 0; i < STEER_MAGLEV_PROBES; i++) {
		__u32 pos = svc->id * STEER_MAGLEV_SIZE + (start + i) % STEER_MAGLEV_SIZE;
		enum table_entry entry;

		entry = try_entry(svc, bpf_map_lookup_elem(&maglev, &pos), backend_id);

		if (entry != ENTRY_FULL)
			return entry == ENTRY_TAKEN ? 0 : -1;
	}
	return -1;
}

static __always_inline int pick_backend(const struct steer_service *svc, __be32 client_addr,
					__u32 *backend_id)
{
	switch (svc->policy) {
	case STEER_POLICY_ROUND_ROBIN:
		return pick_round_robin(svc, backend_id);
	case STEER_POLICY_LEAST_CONNECTIONS:
		return pick_least_connections(svc, backend_id);
	case STEER_POLICY_MAGLEV:
		return pick_maglev(svc, client_addr, backend_id);
	case STEER_POLICY_SLOTS:
		return pick_slots(svc, backend_id);
	default:
		return -1;
	}
}

#endif /* STEER_POLICY_H */
