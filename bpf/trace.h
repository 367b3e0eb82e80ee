/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The event that `sockredir trace`'s sock_ops program (trace.c) sends to user
 * space. pkg/trace decodes it; bpf2go generates its Go type from this file.
 * Independent of the datapath's keys and maps (sockredir.h). */
#ifndef __SOCKREDIR_TRACE_H
#define __SOCKREDIR_TRACE_H

#include <linux/types.h>

/* One sock_ops callback of one socket. */
struct event {
	__u64 ktime_ns;       /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 socket_cookie;  /* names the socket for its whole life */
	__u64 netns_cookie;   /* SO_NETNS_COOKIE of the socket's namespace */
	__u64 bytes_acked;
	__u64 bytes_received;
	__u32 local_ip[4];    /* network byte order; IPv4 as IPv4-mapped IPv6 */
	__u32 remote_ip[4];   /* network byte order; IPv4 as IPv4-mapped IPv6 */
	__u32 op;             /* BPF_SOCK_OPS_* */
	__u32 family;         /* the socket's own: AF_INET or AF_INET6 */
	__u32 local_port;     /* host byte order */
	__u32 remote_port;    /* host byte order */
	/* The op's arguments (enum BPF_SOCK_OPS_* in linux/bpf.h): old and new
	 * state for STATE_CB; sequence number, segments and error for
	 * RETRANS_CB; retransmits, RTO and "expired" for RTO_CB. */
	__u32 args[3];
	__u32 state;          /* BPF_TCP_*: the socket's state during the callback */
	__u32 srtt_us;        /* smoothed RTT, µs */
	__u32 snd_cwnd;       /* congestion window, segments */
	__u32 total_retrans;  /* segments retransmitted so far */
	__u32 pad;
};

#endif /* __SOCKREDIR_TRACE_H */
