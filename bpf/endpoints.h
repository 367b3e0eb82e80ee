/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* A connection's two ends as a sock_ops program sees them, for the datapath
 * (sockops.c) and the tracer (trace.c) alike. */
#ifndef __SOCKREDIR_ENDPOINTS_H
#define __SOCKREDIR_ENDPOINTS_H

#include <linux/bpf.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10

struct endpoints {
	__u32 local_ip[4];  /* network byte order; IPv4 as IPv4-mapped IPv6 */
	__u32 remote_ip[4]; /* network byte order; IPv4 as IPv4-mapped IPv6 */
	__u32 local_port;   /* host byte order */
	__u32 remote_port;  /* host byte order */
	__u32 family;       /* the socket's own: AF_INET or AF_INET6 */
};

/* A context field read right here, unconditionally. The verifier only
 * accepts context reads at a constant offset from the context pointer;
 * without volatile, clang may sink a read into the branch that uses it and
 * address it through a computed pointer, which the verifier rejects. */
#define CTX(field) (*(volatile __typeof__(field) *)&(field))

/* Fills e from a full or a request socket. */
static __always_inline void read_endpoints(struct bpf_sock_ops *skops, struct endpoints *e)
{
	__u32 local4 = CTX(skops->local_ip4), remote4 = CTX(skops->remote_ip4);
	__u32 local6[4] = { CTX(skops->local_ip6[0]), CTX(skops->local_ip6[1]),
			    CTX(skops->local_ip6[2]), CTX(skops->local_ip6[3]) };
	__u32 remote6[4] = { CTX(skops->remote_ip6[0]), CTX(skops->remote_ip6[1]),
			     CTX(skops->remote_ip6[2]), CTX(skops->remote_ip6[3]) };

	__builtin_memset(e, 0, sizeof(*e));
	e->family = CTX(skops->family);
	if (e->family == AF_INET) {
		e->local_ip[2] = bpf_htonl(0xffff);
		e->local_ip[3] = local4;
		e->remote_ip[2] = bpf_htonl(0xffff);
		e->remote_ip[3] = remote4;
	} else {
		__builtin_memcpy(e->local_ip, local6, sizeof(local6));
		__builtin_memcpy(e->remote_ip, remote6, sizeof(remote6));
	}
	e->local_port = CTX(skops->local_port);
	e->remote_port = bpf_ntohl(CTX(skops->remote_port));
}

#endif /* __SOCKREDIR_ENDPOINTS_H */
