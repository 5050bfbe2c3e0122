/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Backend ids: slot s of service n is backend n * STEER_MAX_BACKENDS_PER_SERVICE
 * + s, so a service's backends are one block of each per-backend array (the
 * agent numbers them the same way). */
#ifndef STEER_IDS_H
#define STEER_IDS_H

#include <bpf/bpf_helpers.h>	/* __always_inline that inlines (linux/stddef.h's only hints) */
#include "steer_abi.h"

static __always_inline __u32 backend_id_of(__u32 service_id, __u32 slot)
{
	return service_id * STEER_MAX_BACKENDS_PER_SERVICE + slot;
}

static __always_inline __u32 backend_service_id(__u32 backend_id)
{
	return backend_id / STEER_MAX_BACKENDS_PER_SERVICE;
}

#endif /* STEER_IDS_H */
