// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* iter/tcp program: reports each of sockredir's sockets in the iterating
 * namespace (those in sock_hash, found by their sock_states entry): how many
 * redirected bytes are still waiting for its application to read them, and
 * how it sends. Removing a socket from sock_hash frees that queue, so
 * `sockredir down` and the daemon only remove sockets whose queue is empty.
 * (iter/sockmap would walk the map directly, but some kernels refuse it.)
 *
 * It marks the server port of a socket that splices, at every look. With
 * max_backlog set (datapath.Maintainer, which the daemon runs), it also
 * puts connections back on TCP (refuse):
 *   - backpressure: tcp_bpf queues redirected bytes without limit, so the
 *     connection of a socket with more than max_backlog waiting goes back to
 *     TCP, whose receive window holds the sender back;
 *   - blocking readers: tcp_bpf can fail a blocking recv(2) with EAGAIN (see
 *     sockops.c). sock_ops can't tell whether an accepted socket blocks, as
 *     it has no file yet, and a client may turn blocking after connecting;
 *     here the file is known. A blocking server's port is remembered, so its
 *     later connections stay on TCP from the start;
 *   - splice readers (see splicewatch.c): a splice reader's connection goes
 *     back to TCP where that leaves no hole (turn_pair_to_tcp), as does a
 *     refused connection, so that the upkeep can release them;
 *     one in `aborts` (datapath.Maintainer puts a splice reader there whose
 *     redirected bytes nobody reads) has its connection aborted, so that
 *     both applications get an error instead of waiting forever for bytes
 *     that splice(2) can't see;
 *   - probation (sockops.c): see look_at_probation. */
#include "sockredir.h"
#include <bpf/bpf_core_read.h>

/* Set by the loader; 0 only reports. */
const volatile __u64 max_backlog = 0;

/* How long a probation connection is watched before the upkeep may clear
 * its port while it lasts. */
#define PROBATION_MIN_MS 1000

/* Sockets to abort, by their own key, with the redirected bytes that
 * waited at them when the Maintainer chose them. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct sock_key);
	__type(value, __u64);
} aborts SEC(".maps");

/* Whether the socket with key, whose queue holds unread bytes now, is to be
 * aborted: the Maintainer chose it, and its queue hasn't shrunk since (one
 * that did is being read after all). */
static __always_inline int to_abort(struct sock_key *key, __u64 unread)
{
	__u64 *chosen = bpf_map_lookup_elem(&aborts, key);
	int abort;

	if (!chosen)
		return 0;
	abort = unread >= *chosen;
	bpf_map_delete_elem(&aborts, key);
	return abort;
}

/* 6.5 and later (a weak kfunc: NULL where missing). Where it is missing,
 * the Maintainer chooses no socket to abort (canAbort). */
extern int bpf_sock_destroy(struct sock_common *sk) __ksym __weak;

/* Whether the socket's application has it in blocking mode; not known (0)
 * before accept(2) gives it a file, or after close(2). */
static __always_inline int reads_blocking(struct tcp_sock *tp)
{
	long flags = file_flags((struct sock *)tp);

	return flags >= 0 && !(flags & O_NONBLOCK);
}

/* The upkeep's look at a probation server socket. sock_ops sees it only at
 * state changes, and the port is cleared when it closes; a connection that
 * lasts (a proxy's pool keeps its connections for hours) would hold its
 * port's next connections on TCP for as long. So the upkeep looks at its
 * file now, and once it has been watched for PROBATION_MIN_MS with its
 * application having read data, non-blocking, with nothing marking the
 * port, clears the port. The socket itself stays on TCP, watched, and marks
 * the port still if it turns to splice or (6.1) FIONREAD. */
static __always_inline void look_at_probation(struct sock_state *st, struct tcp_sock *tp)
{
	struct settings *s = get_settings();

	if (!s || !(st->flags & SOCK_PASSIVE))
		return;
	note_file_mode(st, tp, s);
	if ((__u32)(probation_clock() - st->probation_ms) >= PROBATION_MIN_MS &&
	    still_watched(st, BPF_CORE_READ((struct sock_common *)tp, skc_cookie.counter)))
		clear_server_port(st, tp);
}

/* Sockets whose sends go back to TCP, chosen by the Maintainer (see
 * turn_pair_to_tcp), which sees both ends of a connection. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct sock_key);
	__type(value, __u8);
} stop_redirecting SEC(".maps");

/* Puts a connection back on TCP wherever that leaves no hole, so that the
 * upkeep can release the pair instead of leaving it in sock_hash (with
 * max_backlog set, as this changes how sockets send):
 *   - a splice reader's peer that has sent nothing yet declines here, as
 *     its first message would (redirect.c, connection_refused): splice
 *     reads over TCP what it sends. The swap leaves a decision made
 *     meanwhile alone;
 *   - a socket the Maintainer tells (stop_redirecting): one in a refused
 *     connection, which its next message would put on TCP anyway, or a
 *     splice reader whose peer passes and doesn't splice. This program sees
 *     one socket at a time. Not if its peer has begun to splice since: then
 *     its TCP bytes would reach the splicer past those redirected to it
 *     (splicewatch.c), and the release would free those. */
static __always_inline void turn_pair_to_tcp(struct sock_state *st, struct sock_key *own)
{
	__u32 *peer_refusal = bpf_map_lookup_elem(&refusals, &st->peer);
	int peer_splices = peer_refusal && *peer_refusal == REFUSED_SPLICE;

	if (bpf_map_lookup_elem(&stop_redirecting, own)) {
		if (!peer_splices)
			st->mode = MODE_PASS;
		bpf_map_delete_elem(&stop_redirecting, own);
	}
	if (peer_splices && __sync_val_compare_and_swap(&st->mode, MODE_UNDECIDED, MODE_PASS) == MODE_UNDECIDED)
		count(COUNTER_PAIRS_DECLINED, 1);
}

struct socket_report {
	struct sock_key key;
	__u64 unread; /* redirected bytes still queued (a lower bound on 6.1) */
	__u32 mode;    /* enum redirect_mode */
	__u32 refused; /* why it refused redirected bytes (enum refusal), or 0 */
};

/* Kernels without msg_tot_len (6.1) get the queue walked, this far. */
#define MAX_WALK 64

/* At least 1 whenever a message is queued: `down` relies on that. */
static __always_inline __u64 queued_bytes(struct sk_psock *psock)
{
	struct list_head *head = &psock->ingress_msg;
	struct list_head *node = BPF_CORE_READ(psock, ingress_msg.next);
	__u64 bytes = 0;

	if (!node || node == head)
		return 0;
	if (bpf_core_field_exists(psock->msg_tot_len))
		bytes = BPF_CORE_READ(psock, msg_tot_len);
	else
		for (int i = 0; i < MAX_WALK && node && node != head; i++) {
			struct sk_msg *msg = (void *)node - bpf_core_field_offset(struct sk_msg, list);

			bytes += BPF_CORE_READ(msg, sg.size);
			node = BPF_CORE_READ(node, next);
		}
	return bytes ? bytes : 1;
}

SEC("iter/tcp")
int sockredir_inspect(struct bpf_iter__tcp *ctx)
{
	struct socket_report r = {};
	struct sock_state *st;
	struct sock_common *skc = ctx->sk_common;
	struct tcp_sock *tp;
	struct sk_psock *psock;
	void *user_data;
	__u32 *why;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	st = bpf_sk_storage_get(&sock_states, tp, 0, 0);
	if (!st)
		return 0;
	if (st->flags & SOCK_PROBATION) {
		if (max_backlog)
			look_at_probation(st, tp);
		return 0;
	}
	user_data = BPF_CORE_READ((struct sock *)tp, sk_user_data);
	psock = (void *)((unsigned long)user_data & SK_USER_DATA_PTRMASK);
	if (!psock)
		return 0; /* no longer in sock_hash */
	mirror_key(&st->peer, &r.key);
	r.unread = queued_bytes(psock);
	/* The type check also keeps sock_common's BTF whole, not a bare
	 * declaration: cilium/ebpf matches bpf_sock_destroy's argument with it. */
	if (to_abort(&r.key, r.unread) && bpf_sock_destroy && bpf_core_type_exists(struct sock_common)) {
		bpf_sock_destroy(skc);
		return 0;
	}
	if (max_backlog) {
		struct settings *s = get_settings();

		if (r.unread > max_backlog)
			refuse(st, REFUSED_BACKLOG);
		else if (s && !(s->policy & POLICY_ACCELERATE_BLOCKING) && reads_blocking(tp))
			refuse(st, REFUSED_BLOCKING);
		turn_pair_to_tcp(st, &r.key);
	}
	why = bpf_map_lookup_elem(&refusals, &r.key);
	r.refused = why ? *why : 0;
	if (r.refused == REFUSED_SPLICE)
		mark_server_port(st, &r.key, REFUSED_SPLICE); /* it may never send again */
	r.mode = st->mode;
	bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
	return 0;
}

char _license[] SEC("license") = "Dual BSD/GPL";
