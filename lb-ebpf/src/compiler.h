/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Accesses the compiler must leave as written. */
#ifndef STEER_COMPILER_H
#define STEER_COMPILER_H

/* One load of memory another CPU or the agent may change meanwhile: never
 * merged with, nor repeated after, another read of it. */
#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))

#endif /* STEER_COMPILER_H */
