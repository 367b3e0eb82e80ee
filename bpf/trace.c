// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* sock_ops program of `sockredir trace`: sends the TCP events of the sockets
 * in the cgroup to user space through a ring buffer.
 *
 * It runs next to the datapath's sock_ops program (both attached with BPF
 * links, which the kernel runs one after the other) and only observes: it
 * never writes skops->reply, and always returns 1. Connection setup, listen
 * and establishment call every sock_ops program anyway; the other callbacks
 * (state changes, RTOs, retransmits, RTT samples) would cost a call at every
 * one of those, so the kernel makes them only for sockets that asked with
 * bpf_sock_ops_cb_flags_set. This program asks at connection setup, so only
 * connections opened while someone traces pay for them.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "trace.h"
#include "endpoints.h"

/* The callbacks that tracing switches on for a socket. */
#define TRACE_CB_FLAGS (BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG | \
			BPF_SOCK_OPS_RETRANS_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG)

/* Filters, set by the loader (pkg/trace) before loading. 0 matches every
 * port; a socket matches the address filter when its local or remote
 * address, masked, equals filter_net. An all-zero mask matches everything. */
const volatile __u16 filter_port = 0;
const volatile __u32 filter_net[4] = {};  /* network byte order, IPv4-mapped */
const volatile __u32 filter_mask[4] = {}; /* network byte order */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20); /* the loader may change it */
	__type(value, struct event);  /* for bpf2go; the kernel sees no type */
} events SEC(".maps");

/* Events that found the ring buffer full. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost_events SEC(".maps");

static __always_inline int addr_matches(const __u32 ip[4])
{
	return (ip[0] & filter_mask[0]) == filter_net[0] &&
	       (ip[1] & filter_mask[1]) == filter_net[1] &&
	       (ip[2] & filter_mask[2]) == filter_net[2] &&
	       (ip[3] & filter_mask[3]) == filter_net[3];
}

static __always_inline int matches(const struct endpoints *t)
{
	if (filter_port && t->local_port != filter_port && t->remote_port != filter_port)
		return 0;
	return addr_matches(t->local_ip) || addr_matches(t->remote_ip);
}

static __always_inline void count_lost(void)
{
	__u32 key = 0;
	__u64 *n = bpf_map_lookup_elem(&lost_events, &key);

	if (n)
		*n += 1;
}

static __always_inline void emit(struct bpf_sock_ops *skops, const struct endpoints *t)
{
	/* Everything is read first: the reader waits at a reserved record until
	 * it is submitted. */
	__u32 op = CTX(skops->op);
	__u32 args[3] = { CTX(skops->args[0]), CTX(skops->args[1]), CTX(skops->args[2]) };
	__u32 state = CTX(skops->state), srtt = CTX(skops->srtt_us), cwnd = CTX(skops->snd_cwnd);
	__u32 total_retrans = CTX(skops->total_retrans);
	__u64 acked = CTX(skops->bytes_acked), received = CTX(skops->bytes_received);
	__u64 socket_cookie = bpf_get_socket_cookie(skops);
	__u64 netns_cookie = bpf_get_netns_cookie(skops);
	struct event *ev;

	ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (!ev) {
		count_lost();
		return;
	}
	ev->ktime_ns = bpf_ktime_get_ns();
	ev->socket_cookie = socket_cookie;
	ev->netns_cookie = netns_cookie;
	ev->bytes_acked = acked;
	ev->bytes_received = received;
	__builtin_memcpy(ev->local_ip, t->local_ip, sizeof(ev->local_ip));
	__builtin_memcpy(ev->remote_ip, t->remote_ip, sizeof(ev->remote_ip));
	ev->op = op;
	ev->family = t->family;
	ev->local_port = t->local_port;
	ev->remote_port = t->remote_port;
	__builtin_memcpy(ev->args, args, sizeof(ev->args));
	ev->state = state;
	ev->srtt_us = srtt >> 3; /* the kernel keeps it scaled by 8 */
	ev->snd_cwnd = cwnd;
	ev->total_retrans = total_retrans;
	ev->pad = 0;
	bpf_ringbuf_submit(ev, 0);
}

SEC("sockops")
int sockredir_trace(struct bpf_sock_ops *skops)
{
	struct endpoints t;
	__u32 op = CTX(skops->op);
	__u32 flags = CTX(skops->bpf_sock_ops_cb_flags);

	switch (op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
	case BPF_SOCK_OPS_STATE_CB:
	case BPF_SOCK_OPS_RTO_CB:
	case BPF_SOCK_OPS_RETRANS_CB:
	case BPF_SOCK_OPS_RTT_CB:
		break;
	default:
		return 1;
	}
	read_endpoints(skops, &t);
	if (!matches(&t))
		return 1;
	/* OR-ed into the socket's flags, so that those another program set
	 * stay. Listeners get none: their connections would inherit them and
	 * keep paying after tracing stops. */
	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB || op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB ||
	    op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		bpf_sock_ops_cb_flags_set(skops, flags | TRACE_CB_FLAGS);
	emit(skops, &t);
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
