// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* iter/tcp program: reports each of sockredir's sockets in the iterating
 * namespace (those with a sock_states entry) and whether redirected bytes are
 * still waiting for its application to read them. Removing a socket from
 * sock_hash frees that queue, so `sockredir down` only removes sockets whose
 * queue is empty. (iter/sockmap would walk the map directly, but some kernels
 * refuse it.) */
#include "sockredir.h"
#include "kernel.h"
#include <bpf/bpf_core_read.h>

struct socket_report {
	struct sock_key key;
	__u32 unread; /* 1 if redirected bytes are still queued */
	__u32 pad;
};

SEC("iter/tcp")
int sockredir_inspect(struct bpf_iter__tcp *ctx)
{
	struct socket_report r = {};
	struct sock_state *st;
	struct sock_common *skc = ctx->sk_common;
	struct tcp_sock *tp;
	struct sk_psock *psock;
	struct list_head *first = 0;
	void *user_data;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	st = bpf_sk_storage_get(&sock_states, tp, 0, 0);
	if (!st)
		return 0;
	mirror_key(&st->peer, &r.key);
	user_data = BPF_CORE_READ((struct sock *)tp, sk_user_data);
	psock = (void *)((unsigned long)user_data & SK_USER_DATA_PTRMASK);
	if (psock) {
		bpf_probe_read_kernel(&first, sizeof(first), &psock->ingress_msg.next);
		r.unread = first != &psock->ingress_msg;
	}
	bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
	return 0;
}

char _license[] SEC("license") = "Dual BSD/GPL";
