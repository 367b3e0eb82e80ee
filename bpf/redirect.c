// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* sk_msg program: runs on every sendmsg of a socket in sock_hash and moves
 * the message into the peer's receive queue (BPF_F_INGRESS), skipping the
 * TCP/IP stack. Anything it can't redirect safely goes the normal way. */
#include "sockredir.h"

/* A connection may switch to redirecting only on its first message: bytes
 * already sent over TCP could still be unread, and the receiver reads
 * redirected bytes before those, which would reorder them. */
static __always_inline int nothing_sent_over_tcp(struct bpf_sock *sk, struct sock_state *st)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);

	return tp && tp->write_seq == st->peer.remote_seq;
}

/* A client whose server hasn't paired yet withdraws from the pair: the
 * server, at the end of its handshake, then stays out of sock_hash and takes
 * this socket out too (sockops.c, pair_passive). Returns 0 if the server has
 * paired already (or its handshake is over): it is in sock_hash, or gone. */
static __always_inline int withdraw(struct sock_state *st)
{
	struct sock_key own;
	__u32 *stage;

	mirror_key(&st->peer, &own);
	stage = bpf_map_lookup_elem(&pending, &own);
	return stage && advance_pending(&own, stage, PENDING_CLIENT, PENDING_DECLINED);
}

/* Leaves a socket's sends on the normal path for good. (A sk_msg program
 * may not delete from a sockhash: its peer's handshake takes it out, or the
 * upkeep releases the pair once neither redirects.) */
static __always_inline void decline(struct sock_state *st)
{
	withdraw(st);
	st->mode = MODE_PASS;
	count(COUNTER_PAIRS_DECLINED, 1);
}

/* Whether the connection is to go back to TCP: either socket refused
 * redirected bytes (see refuse). A socket that splices (the splice watch) is
 * the exception once bytes have been redirected to it: bytes sent over TCP
 * now would reach it ahead of those waiting in its psock queue, a hole in
 * its stream, so its peer goes on redirecting (see splicewatch.c). A peer
 * that hasn't sent yet has nothing waiting there, and sends over TCP, which
 * splice reads. When it is this socket that splices, its server port is
 * marked here, where its state is at hand. This socket's other refusals set
 * its mode already (refuse), except where it redirects to a splice reader:
 * it goes on then, even should the reader's refusal have fallen out of the
 * LRU map. mode is this socket's, as the message found it. Looks only when
 * some socket refused since this one last looked. */
static __always_inline int connection_refused(struct sock_state *st, __u32 mode)
{
	__u32 *gen = get_refusal_gen(), *why;
	struct sock_key own;

	if (!gen || *gen == st->seen_refusals)
		return 0;
	st->seen_refusals = *gen;
	why = bpf_map_lookup_elem(&refusals, &st->peer);
	if (why)
		return *why != REFUSED_SPLICE || mode == MODE_UNDECIDED;
	mirror_key(&st->peer, &own);
	why = bpf_map_lookup_elem(&refusals, &own);
	if (!why)
		return 0;
	if (*why != REFUSED_SPLICE)
		return mode == MODE_UNDECIDED;
	mark_server_port(st, &own, REFUSED_SPLICE);
	return 0;
}

/* Redirects a socket's first message. A client that finds no peer in
 * sock_hash may have overtaken its server's handshake: it withdraws, unless
 * the server paired meanwhile, in which case the server is there now. */
static __always_inline int redirect_first(struct sk_msg_md *msg, struct sock_state *st)
{
	if (bpf_msg_redirect_hash(msg, &sock_hash, &st->peer, BPF_F_INGRESS) == SK_PASS)
		return 1;
	return !withdraw(st) && bpf_msg_redirect_hash(msg, &sock_hash, &st->peer, BPF_F_INGRESS) == SK_PASS;
}

SEC("sk_msg")
int sockredir_redirect(struct sk_msg_md *msg)
{
	struct settings *settings = get_settings();
	struct bpf_sock *sk = msg->sk;
	struct sock_state *st;
	__u32 mode;

	if (!sk || !settings)
		goto pass;
	/* Only a connected socket sends to its peer (a TCP Fast Open server
	 * may answer in SYN_RECV). One that connect(2) with AF_UNSPEC
	 * dissolved stays in sock_hash until it connects again (sockops.c,
	 * forget_last_connection): TCP fails its sends meanwhile. */
	if (sk->state != BPF_TCP_ESTABLISHED && sk->state != BPF_TCP_CLOSE_WAIT && sk->state != BPF_TCP_SYN_RECV)
		goto pass;
	st = bpf_sk_storage_get(&sock_states, sk, 0, 0);
	if (!st)
		goto pass;
	/* Read once: the guards, the setsockopt program and the upkeep's
	 * inspector set it to MODE_PASS from other CPUs, and a message must
	 * act on one value. */
	mode = *(volatile __u32 *)&st->mode;
	if (mode == MODE_PASS)
		goto pass;
	if (connection_refused(st, mode)) {
		if (mode == MODE_UNDECIDED)
			decline(st);
		else
			st->mode = MODE_PASS;
		goto pass;
	}
	if (mode == MODE_UNDECIDED) {
		if (settings->pass_only) {
			st->mode = MODE_PASS;
			goto pass;
		}
		/* Claimed before the first redirect, so that a decision to
		 * pass made elsewhere meanwhile stands (inspect.c declines a
		 * splice reader's peer that hasn't sent yet). */
		if (__sync_val_compare_and_swap(&st->mode, MODE_UNDECIDED, MODE_REDIRECT) != MODE_UNDECIDED)
			goto pass;
		if (!settings->redirect_enabled || !nothing_sent_over_tcp(sk, st) ||
		    !redirect_first(msg, st)) {
			decline(st);
			goto pass;
		}
		goto redirected;
	}
	/* Stopping is safe at any message: the receiver reads what was
	 * redirected before what comes over TCP. Starting again is not. A
	 * splice reader is the exception (connection_refused): splice would
	 * read the TCP bytes past those waiting for it. */
	if (!settings->redirect_enabled && !redirects_to_splicer(st)) {
		st->mode = MODE_PASS;
		goto pass;
	}
	if (bpf_msg_redirect_hash(msg, &sock_hash, &st->peer, BPF_F_INGRESS) != SK_PASS) {
		/* The peer has closed: TCP reports that as usual, and this
		 * direction stays on TCP like any other fallback. */
		st->mode = MODE_PASS;
		goto pass;
	}
redirected:
	count(COUNTER_MSGS_REDIRECTED, 1);
	count(COUNTER_BYTES_REDIRECTED, msg->size);
	return SK_PASS;
pass:
	count(COUNTER_MSGS_PASSED, 1);
	count(COUNTER_BYTES_PASSED, msg->size);
	return SK_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
