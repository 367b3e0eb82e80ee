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
 *      only the real peer can produce, and hasn't withdrawn (a client may
 *      send before this callback; see pair_passive).
 *
 * Probation: some ways of reading a socket (splice(2), FIONREAD on 6.1,
 * blocking recv(2)) lose or stall redirected bytes, and some kernels can't
 * keep them away from those bytes (docs/correctness.md). So a server port's
 * connections stay on plain TCP, both sockets out of sock_hash and watched,
 * until one of them has ended after its server read data from a
 * non-blocking socket and nothing marked the port (refuse): the port is then
 * cleared, and its next connections are accelerated. The upkeep may clear it
 * sooner, while the connection lasts (inspect.c, look_at_probation).
 */
#include "sockredir.h"
#include "endpoints.h"
#include <bpf/bpf_core_read.h>

/* Socket options, from the UAPI headers the BPF build doesn't include. */
#define SOL_SOCKET 1
#define SO_SNDBUF 7
#define SO_RCVBUF 8
#define SOL_TCP 6
#define TCP_CONGESTION 13

/* Ports and peers the redirect policy includes or excludes (pkg/policy). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u32);
} policy_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct cidr_key);
	__type(value, __u32);
} policy_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_TUNING_RULES);
	__type(key, __u32);
	__type(value, struct tuning_rule);
} tuning_rules SEC(".maps");

/* Consumes the pending entry k at stage, if there is one. */
static __always_inline int take_pending(struct sock_key *k, __u32 stage)
{
	__u32 *v = bpf_map_lookup_elem(&pending, k);

	if (!v || pending_stage(k, *v) != stage)
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

/* Fills k from a full or a request socket; sequence numbers stay 0. */
static __always_inline void key_from_ops(struct bpf_sock_ops *skops, struct sock_key *k)
{
	struct endpoints e;

	read_endpoints(skops, &e);
	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(k->local_ip, e.local_ip, sizeof(k->local_ip));
	__builtin_memcpy(k->remote_ip, e.remote_ip, sizeof(k->remote_ip));
	k->family = is_v4mapped(k->remote_ip) ? AF_INET : AF_INET6;
	k->local_port = e.local_port;
	k->remote_port = e.remote_port;
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

static __always_inline __u32 port_verdict(__u32 port)
{
	__u16 key = port;
	__u32 *v = bpf_map_lookup_elem(&policy_ports, &key);

	return v ? *v : 0;
}

/* Whether the redirect policy lets connection k be accelerated: nothing
 * excluded on either port or the peer, and, when the policy includes only
 * some, an included port and peer. */
static __always_inline int policy_allows(struct settings *s, struct sock_key *k)
{
	__u32 local = port_verdict(k->local_port), remote = port_verdict(k->remote_port);
	struct cidr_key peer = { .prefixlen = 128 };
	__u32 *cidr;

	__builtin_memcpy(peer.addr, k->remote_ip, sizeof(peer.addr));
	cidr = bpf_map_lookup_elem(&policy_cidrs, &peer);
	if (local == POLICY_EXCLUDE || remote == POLICY_EXCLUDE || (cidr && *cidr == POLICY_EXCLUDE))
		return 0;
	if ((s->policy & POLICY_INCLUDE_PORTS) && local != POLICY_INCLUDE && remote != POLICY_INCLUDE)
		return 0;
	if ((s->policy & POLICY_INCLUDE_CIDRS) && !(cidr && *cidr == POLICY_INCLUDE))
		return 0;
	return 1;
}

/* The loops below have small constant bounds and are unrolled: older
 * verifiers (6.1, 6.12) reject them as loops. */

static __always_inline int in_cidr(const struct cidr_key *c, const __u32 ip[4])
{
	__u32 bits = c->prefixlen;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		__u32 mask = bits >= 32 ? 0xffffffff : bits == 0 ? 0 : bpf_htonl(0xffffffff << (32 - bits));

		if ((ip[i] ^ c->addr[i]) & mask)
			return 0;
		bits = bits > 32 ? bits - 32 : 0;
	}
	return 1;
}

static __always_inline int rule_matches(struct tuning_rule *r, struct sock_key *k)
{
	int port_ok = r->nports == 0, cidr_ok = r->ncidrs == 0;

#pragma unroll
	for (int i = 0; i < MAX_RULE_PORTS; i++)
		if (i < r->nports && (r->ports[i] == k->local_port || r->ports[i] == k->remote_port))
			port_ok = 1;
#pragma unroll
	for (int i = 0; i < MAX_RULE_CIDRS; i++)
		if (i < r->ncidrs && in_cidr(&r->cidrs[i], k->remote_ip))
			cidr_ok = 1;
	return port_ok && cidr_ok;
}

/* The first tuning rule that matches connection k, if any. */
static __always_inline struct tuning_rule *tuning_for(struct settings *s, struct sock_key *k)
{
#pragma unroll
	for (__u32 i = 0; i < MAX_TUNING_RULES; i++) {
		__u32 key = i;
		struct tuning_rule *r;

		if (i >= s->tuning_rules)
			break;
		r = bpf_map_lookup_elem(&tuning_rules, &key);
		if (r && rule_matches(r, k))
			return r;
	}
	return 0;
}

/* Applies a rule's socket options; called before the SYN (client) and when
 * the connection is established (both sides, the server's first chance). */
static __always_inline void apply_sockopts(struct bpf_sock_ops *skops, struct tuning_rule *r)
{
	int v;

	if (r->set & TUNE_SNDBUF) {
		v = r->sndbuf;
		bpf_setsockopt(skops, SOL_SOCKET, SO_SNDBUF, &v, sizeof(v));
	}
	if (r->set & TUNE_RCVBUF) {
		v = r->rcvbuf;
		bpf_setsockopt(skops, SOL_SOCKET, SO_RCVBUF, &v, sizeof(v));
	}
	if (r->set & TUNE_CONGESTION)
		bpf_setsockopt(skops, SOL_TCP, TCP_CONGESTION, r->congestion, sizeof(r->congestion));
}

/* Answers the ops that ask for a value, and sets socket options, for a
 * connection that a tuning rule matches. */
static __always_inline void tune(struct bpf_sock_ops *skops, struct settings *s)
{
	struct tuning_rule *r;
	struct sock_key k;
	int v;

	if (!s->tuning_rules)
		return;
	key_from_ops(skops, &k);
	r = tuning_for(s, &k);
	if (!r)
		return;
	switch (skops->op) {
	case BPF_SOCK_OPS_TIMEOUT_INIT:
		if (r->set & TUNE_SYN_RTO)
			skops->reply = r->syn_rto_jiffies;
		break;
	case BPF_SOCK_OPS_RWND_INIT:
		if (r->set & TUNE_RWND_INIT)
			skops->reply = r->rwnd_init;
		break;
	case BPF_SOCK_OPS_BASE_RTT:
		if (r->set & TUNE_BASE_RTT)
			skops->reply = r->base_rtt_us;
		break;
	case BPF_SOCK_OPS_NEEDS_ECN:
		if (r->set & TUNE_NEEDS_ECN)
			skops->reply = 1;
		break;
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		apply_sockopts(skops, r);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		apply_sockopts(skops, r);
		if (r->set & TUNE_INIT_CWND) {
			v = r->init_cwnd;
			bpf_setsockopt(skops, SOL_TCP, TCP_BPF_IW, &v, sizeof(v));
		}
		break;
	}
}

/* Whether a socket reads in a way that tcp_bpf gets wrong from the start: it
 * set SO_RCVLOWAT before it was connected, or its server port refused before
 * (refuse). Such a connection stays on TCP, both of its sockets out
 * of sock_hash. */
static __always_inline int refuses_from_start(struct tcp_sock *tp, struct sock_key *k, int passive)
{
	int refused = BPF_CORE_READ((struct sock *)tp, sk_rcvlowat) > 1;
	struct port_key port;

	if (!refused && passive) {
		server_port(k, 1, &port);
		refused = bpf_map_lookup_elem(&refusing_ports, &port) != 0;
	}
	if (refused)
		count(COUNTER_INBOUND_REFUSED, 1);
	return refused;
}

/* Gives a socket its state, for connection k. */
static __always_inline struct sock_state *init_state(struct bpf_sock *sk, struct sock_key *k, __u32 flags)
{
	struct sock_state *st = bpf_sk_storage_get(&sock_states, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (!st)
		return 0;
	mirror_key(k, &st->peer);
	st->mode = MODE_UNDECIDED;
	st->seen_refusals = 0;
	st->flags = flags;
	return st;
}

static __always_inline int add_socket(struct bpf_sock_ops *skops, struct sock_key *k, __u32 flags)
{
	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return 0;
	if (!init_state(sk, k, flags)) {
		count(COUNTER_ADD_FAILURES, 1);
		return 0;
	}
	/* A full map leaves the connection on the normal path. */
	if (bpf_sock_hash_update(skops, &sock_hash, k, BPF_NOEXIST)) {
		bpf_sk_storage_delete(&sock_states, sk);
		count(COUNTER_ADD_FAILURES, 1);
		return 0;
	}
	return 1;
}

/* Whether connection k (the client's key) is to be its server port's
 * probation. */
static __always_inline int on_probation(struct settings *s, struct sock_key *k)
{
	struct port_key port;

	if (s->policy & POLICY_ACCELERATE_NEW_PORTS)
		return 0;
	server_port(k, 0, &port);
	return !bpf_map_lookup_elem(&cleared_ports, &port);
}

/* Leaves a socket of a probation connection on TCP and watches it: the
 * guards, the setsockopt program and the splice watch (which finds it by its
 * cookie) mark its port when it reads in a way tcp_bpf gets wrong, and its
 * state changes end the probation (watch_probation). */
static __always_inline void begin_probation(struct bpf_sock_ops *skops, struct sock_key *k, __u32 flags)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *st;
	struct port_key port;
	__u64 cookie;

	if (!sk)
		return;
	st = init_state(sk, k, flags | SOCK_PROBATION);
	if (!st)
		return;
	st->mode = MODE_PASS;
	st->probation_ms = probation_clock();
	server_port(k, flags & SOCK_PASSIVE, &port);
	cookie = bpf_get_socket_cookie(skops);
	bpf_map_update_elem(&probation_sockets, &cookie, &port, BPF_ANY);
	bpf_sock_ops_cb_flags_set(skops, CTX(skops->bpf_sock_ops_cb_flags) | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* Server side, SYN received: remember that this end is in the cgroup. */
static __always_inline void note_handshake(struct bpf_sock_ops *skops)
{
	struct sock_key k;
	__u32 v;

	key_from_ops(skops, &k);
	if (!remote_is_local(&k))
		return;
	v = pending_value(&k, PENDING_SYN);
	bpf_map_update_elem(&pending, &k, &v, BPF_ANY);
}

/* A blocking reader of a socket in a sockhash can get EAGAIN from recv(2)
 * whenever it wakes without data (the ACK of its own FIN after a half-close,
 * a signal): tcp_bpf_recvmsg waits only once, on every kernel. So a client
 * that connected with a blocking socket is left on plain TCP unless the
 * policy accepts that risk. A connecting socket without a file is the
 * kernel's own (an in-kernel client: its sockets are in the root cgroup),
 * which reads with kernel_recvmsg: counted as blocking. */
static __always_inline int is_blocking(struct tcp_sock *tp)
{
	long flags = file_flags((struct sock *)tp);

	return flags < 0 || !(flags & O_NONBLOCK);
}

/* The socket of an ESTABLISHED callback as a tcp_sock, for the reads of
 * kernel fields that decide whether it may be paired. */
static __always_inline struct tcp_sock *tcp_sock_of(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;

	return sk ? bpf_skc_to_tcp_sock(sk) : 0;
}

static __always_inline void add_active(struct bpf_sock_ops *skops, struct settings *s)
{
	struct tcp_sock *tp = tcp_sock_of(skops);
	struct sock_key k, server;
	__u32 v;

	if (!s->redirect_enabled)
		return;
	key_from_ops(skops, &k);
	if (!remote_is_local(&k))
		return;
	mirror_key(&k, &server);
	if (!take_pending(&server, PENDING_SYN))
		return;
	/* Data in the SYN (TCP Fast Open) that the server didn't take: it
	 * goes again, and the server's key, made from the sequence number
	 * after the SYN, never matches this one. Left out, this socket can't
	 * be left in the map alone. */
	if (skops->snd_una != skops->snd_nxt)
		return;
	if (!policy_allows(s, &k)) {
		count(COUNTER_POLICY_SKIPPED, 1);
		return;
	}
	if (!tp || (!(s->policy & POLICY_ACCELERATE_BLOCKING) && is_blocking(tp))) {
		count(COUNTER_BLOCKING_SKIPPED, 1);
		return;
	}
	if (refuses_from_start(tp, &k, 0))
		return;

	k.local_seq = skops->snd_nxt;
	k.remote_seq = skops->rcv_nxt;
	if (on_probation(s, &k)) {
		begin_probation(skops, &k, 0);
		v = pending_value(&k, PENDING_PROBATION);
		bpf_map_update_elem(&pending, &k, &v, BPF_ANY);
		return;
	}
	if (add_socket(skops, &k, 0)) {
		count(COUNTER_SOCKETS_ADDED, 1);
		v = pending_value(&k, PENDING_CLIENT);
		bpf_map_update_elem(&pending, &k, &v, BPF_ANY);
	}
}

/* The server's half of the pairing, given the client's pending entry: its
 * key client, its value at stage. The server inserts itself and then claims
 * the entry; a client whose first message finds no server claims it the
 * other way (redirect.c, withdraw). So
 * either that client finds the server in sock_hash when it looks again, or
 * the server finds the withdrawal and leaves before its application can have
 * used the socket: never both in the map with the client on TCP. */
static __always_inline int pair_passive(struct bpf_sock_ops *skops, struct sock_key *k, struct sock_key *client,
					__u32 *stage)
{
	struct tcp_sock *tp = tcp_sock_of(skops);

	if (pending_stage(client, *stage) != PENDING_CLIENT || !tp || refuses_from_start(tp, k, 1) ||
	    !add_socket(skops, k, SOCK_PASSIVE))
		return 0;
	if (advance_pending(client, stage, PENDING_CLIENT, PENDING_PAIRED))
		return 1;
	bpf_map_delete_elem(&sock_hash, k);
	if (skops->sk)
		bpf_sk_storage_delete(&sock_states, skops->sk);
	return 0;
}

/* The server's half of a probation connection. */
static __always_inline void join_probation(struct bpf_sock_ops *skops, struct sock_key *k)
{
	struct tcp_sock *tp = tcp_sock_of(skops);

	if (!tp || refuses_from_start(tp, k, 1))
		return;
	begin_probation(skops, k, SOCK_PASSIVE);
	count(COUNTER_PROBATION_CONNECTIONS, 1);
}

static __always_inline void add_passive(struct bpf_sock_ops *skops)
{
	struct sock_key k, client;
	__u32 *stage;

	key_from_ops(skops, &k);
	if (!remote_is_local(&k))
		return;
	k.local_seq = skops->snd_nxt;
	k.remote_seq = skops->rcv_nxt;
	mirror_key(&k, &client);
	stage = bpf_map_lookup_elem(&pending, &client);
	if (stage && pending_stage(&client, *stage) == PENDING_PROBATION)
		join_probation(skops, &k);
	else if (stage && pair_passive(skops, &k, &client, stage))
		count(COUNTER_SOCKETS_ADDED, 1);
	else
		/* Whenever this side stays out, the client, if it is in,
		 * leaves again: alone in the map it would get its bytes over
		 * TCP through tcp_bpf, which answers FIONREAD wrongly for them
		 * on some kernels. Nothing was redirected to it, since this
		 * side's application has not had the socket yet. */
		bpf_map_delete_elem(&sock_hash, &client);
	if (stage)
		bpf_map_delete_elem(&pending, &client);
}

/* A probation socket changed state. While its application has the server's
 * socket, its file says whether it reads blocking (a connection may end
 * before the server even accepts it, so every change looks). Once the
 * server's socket is closed, the port is cleared if its application read
 * data from it, never blocking, and nothing marked the port meanwhile: the guards
 * and the splice watch mark it when a splice starts, before it reads. */
static __always_inline void watch_probation(struct bpf_sock_ops *skops, struct settings *s)
{
	struct bpf_sock *sk = skops->sk;
	struct tcp_sock *tp = tcp_sock_of(skops);
	struct sock_state *st;
	__u64 cookie;

	if (!sk || !tp)
		return;
	st = bpf_sk_storage_get(&sock_states, sk, 0, 0);
	if (!st || !(st->flags & SOCK_PROBATION))
		return;
	note_file_mode(st, tp, s);
	if (CTX(skops->args[1]) != BPF_TCP_CLOSE)
		return;
	cookie = bpf_get_socket_cookie(skops);
	st->flags &= ~SOCK_PROBATION;
	if (still_watched(st, cookie))
		clear_server_port(st, tp);
	bpf_map_delete_elem(&probation_sockets, &cookie);
}

/* A socket that connects again, after connect(2) with AF_UNSPEC dissolved
 * its connection, leaves sock_hash and forgets its pairing: tcp_disconnect
 * leaves it in the map, where its sends would go on to the old peer and what
 * the old peer redirected would be read before the new connection's bytes.
 * Those bytes go with the psock, as tcp_disconnect discards the rest of the
 * receive queue. */
static __always_inline void forget_last_connection(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *st;
	struct sock_key own;

	if (!sk)
		return;
	st = bpf_sk_storage_get(&sock_states, sk, 0, 0);
	if (!st)
		return;
	mirror_key(&st->peer, &own);
	bpf_map_delete_elem(&sock_hash, &own);
	bpf_sk_storage_delete(&sock_states, sk);
}

SEC("sockops")
int sockredir_sockops(struct bpf_sock_ops *skops)
{
	struct settings *s = get_settings();

	if (!s)
		return 1;
	tune(skops, s);
	switch (skops->op) {
	case BPF_SOCK_OPS_TIMEOUT_INIT:
		/* Also called for the client's own SYN: only request sockets
		 * (not full sockets) are the server side. */
		if (!skops->is_fullsock)
			note_handshake(skops);
		break;
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		forget_last_connection(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		add_active(skops, s);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		add_passive(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		watch_probation(skops, s);
		break;
	}
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
