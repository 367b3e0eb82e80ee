// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* sock_ops program: finds the TCP connections whose two sockets are both in
 * the attached cgroup and puts those sockets into sock_hash.
 *
 * A socket is only ever inserted together with its peer, never alone: a
 * socket in a sockhash gets tcp_bpf's socket operations, which differ from
 * plain TCP (FIONREAD, blocking reads) even when nothing is redirected to it.
 * The evidence that the peer is in the cgroup too, passed on in pending:
 *   1. the server side's SYN handling (TIMEOUT_INIT on the request socket)
 *      records the 4-tuple (PENDING_SYN);
 *   2. the client, at ACTIVE_ESTABLISHED, goes on only if its mirror image is
 *      there, inserts itself and records its full key (PENDING_CLIENT);
 *   3. the server, at PASSIVE_ESTABLISHED, inserts itself only if the client
 *      recorded the key that the two initial sequence numbers make, which
 *      only the real peer can produce.
 */
#include "sockredir.h"
#include "kernel.h"
#include <bpf/bpf_core_read.h>

/* Consumes the pending entry k at stage, if there is one. */
static __always_inline int take_pending(struct sock_key *k, __u32 stage)
{
	__u32 *v = bpf_map_lookup_elem(&pending, k);

	if (!v || *v != stage)
		return 0;
	bpf_map_delete_elem(&pending, k);
	return 1;
}

static __always_inline int is_v4mapped(const __u32 ip[4])
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0xffff);
}

static __always_inline int is_loopback(const __u32 ip[4])
{
	if (is_v4mapped(ip))
		return (bpf_ntohl(ip[3]) >> 24) == 127;
	return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == bpf_htonl(1);
}

/* Fills k from a full or a request socket; sequence numbers stay 0. Every
 * field is read unconditionally: a context field read behind a branch can be
 * compiled into an access through a computed pointer, which the verifier
 * rejects. */
static __always_inline void key_from_ops(struct bpf_sock_ops *skops, struct sock_key *k)
{
	__u32 family = skops->family;
	__u32 local4 = skops->local_ip4, remote4 = skops->remote_ip4;
	__u32 local6[4] = { skops->local_ip6[0], skops->local_ip6[1],
			    skops->local_ip6[2], skops->local_ip6[3] };
	__u32 remote6[4] = { skops->remote_ip6[0], skops->remote_ip6[1],
			     skops->remote_ip6[2], skops->remote_ip6[3] };

	__builtin_memset(k, 0, sizeof(*k));
	if (family == AF_INET) {
		k->local_ip[2] = bpf_htonl(0xffff);
		k->local_ip[3] = local4;
		k->remote_ip[2] = bpf_htonl(0xffff);
		k->remote_ip[3] = remote4;
	} else {
		__builtin_memcpy(k->local_ip, local6, sizeof(local6));
		__builtin_memcpy(k->remote_ip, remote6, sizeof(remote6));
	}
	k->family = is_v4mapped(k->remote_ip) ? AF_INET : AF_INET6;
	k->local_port = skops->local_port;
	k->remote_port = bpf_ntohl(skops->remote_port);
	/* Every namespace has its own loopback: the same 4-tuple can be in use
	 * in two of them at once. */
	if (is_loopback(k->local_ip) || is_loopback(k->remote_ip))
		k->netns = bpf_get_netns_cookie(skops);
}

/* Whether the other end of k is an address of this host. */
static __always_inline int remote_is_local(struct sock_key *k)
{
	return is_loopback(k->remote_ip) || bpf_map_lookup_elem(&local_addrs, k->remote_ip);
}

static __always_inline int add_socket(struct bpf_sock_ops *skops, struct sock_key *k)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *st;

	if (!sk)
		return 0;
	st = bpf_sk_storage_get(&sock_states, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		count(COUNTER_ADD_FAILURES, 1);
		return 0;
	}
	mirror_key(k, &st->peer);
	st->mode = MODE_UNDECIDED;
	/* A full map leaves the connection on the normal path. */
	if (bpf_sock_hash_update(skops, &sock_hash, k, BPF_NOEXIST)) {
		bpf_sk_storage_delete(&sock_states, sk);
		count(COUNTER_ADD_FAILURES, 1);
		return 0;
	}
	count(COUNTER_SOCKETS_ADDED, 1);
	return 1;
}

/* Server side, SYN received: remember that this end is in the cgroup. */
static __always_inline void note_handshake(struct bpf_sock_ops *skops)
{
	struct sock_key k;
	__u32 stage = PENDING_SYN;

	key_from_ops(skops, &k);
	if (!remote_is_local(&k))
		return;
	bpf_map_update_elem(&pending, &k, &stage, BPF_ANY);
}

/* A blocking reader of a socket in a sockhash can get EAGAIN from recv(2)
 * whenever it wakes without data (the ACK of its own FIN after a half-close,
 * a signal): tcp_bpf_recvmsg waits only once, on every kernel. So a client
 * that connected with a blocking socket is left on plain TCP. */
static __always_inline int is_blocking(struct bpf_sock *sk)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);

	return !tp || !(BPF_CORE_READ((struct sock *)tp, sk_socket, file, f_flags) & O_NONBLOCK);
}

static __always_inline void add_active(struct bpf_sock_ops *skops)
{
	struct sock_key k, server;
	__u32 stage = PENDING_CLIENT;

	if (!redirect_enabled())
		return;
	key_from_ops(skops, &k);
	if (!remote_is_local(&k))
		return;
	mirror_key(&k, &server);
	if (!take_pending(&server, PENDING_SYN))
		return;
	if (!skops->sk || is_blocking(skops->sk)) {
		count(COUNTER_BLOCKING_SKIPPED, 1);
		return;
	}

	k.local_seq = skops->snd_nxt;
	k.remote_seq = skops->rcv_nxt;
	if (add_socket(skops, &k))
		bpf_map_update_elem(&pending, &k, &stage, BPF_ANY);
}

static __always_inline void add_passive(struct bpf_sock_ops *skops)
{
	struct sock_key k, client;

	key_from_ops(skops, &k);
	if (!remote_is_local(&k))
		return;
	k.local_seq = skops->snd_nxt;
	k.remote_seq = skops->rcv_nxt;
	mirror_key(&k, &client);
	if (take_pending(&client, PENDING_CLIENT))
		add_socket(skops, &k);
}

SEC("sockops")
int sockredir_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TIMEOUT_INIT:
		/* Also called for the client's own SYN: only request sockets
		 * (not full sockets) are the server side. */
		if (!skops->is_fullsock)
			note_handshake(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		add_active(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		add_passive(skops);
		break;
	}
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
