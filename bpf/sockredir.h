/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Keys, maps and helpers shared by sockredir's BPF programs.
 *
 * The sock_ops program (sockops.c) puts the two sockets of a local TCP
 * connection into sock_hash once both of them are known to be in the
 * attached cgroup; the sk_msg program (redirect.c) then moves every message
 * straight into the peer's receive queue. The Go loader (pkg/datapath) mirrors
 * these layouts; bpf2go generates its types from this file.
 */
#ifndef __SOCKREDIR_H
#define __SOCKREDIR_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "endpoints.h"
#include "kernel.h"

/* A TCP connection as one of its two sockets sees it.
 *
 * IPv4 addresses are kept in their IPv4-mapped IPv6 form (family AF_INET), so
 * an AF_INET6 socket talking to ::ffff:127.0.0.1 and its AF_INET peer derive
 * mirror-image keys. netns tells apart namespaces that use the same loopback
 * 4-tuple at once. local_seq and remote_seq (each side's initial sequence
 * number + 1) make a key name exactly one connection: only the real peer can
 * produce the mirror image, so a stale or colliding 4-tuple never receives
 * someone else's bytes.
 */
struct sock_key {
	__u64 netns;         /* netns cookie for loopback, 0 otherwise */
	__u32 local_ip[4];   /* network byte order */
	__u32 remote_ip[4];  /* network byte order */
	__u32 local_port;    /* host byte order */
	__u32 remote_port;   /* host byte order */
	__u32 local_seq;
	__u32 remote_seq;
	__u32 family;
	__u32 pad;
};

/* What the sk_msg program does with a socket's messages. */
enum redirect_mode {
	/* Paired, but no message sent yet: the first one decides. */
	MODE_UNDECIDED = 0,
	/* Every message goes to the peer's receive queue. */
	MODE_REDIRECT = 1,
	/* Every message takes the normal TCP path, for the rest of the
	 * connection: going back to redirecting could overtake bytes still on
	 * the TCP path. */
	MODE_PASS = 2,
};

/* sock_state.flags */
#define SOCK_PASSIVE (1 << 0)     /* the server side of its connection */
#define SOCK_PROBATION (1 << 1)   /* on TCP, out of sock_hash, watched (sockops.c) */
#define SOCK_NONBLOCKING (1 << 2) /* a probation server's file was seen non-blocking */

/* Per-socket state, in socket-local storage. */
struct sock_state {
	struct sock_key peer;  /* the peer's key in sock_hash */
	__u32 mode;            /* enum redirect_mode, for what this socket sends */
	__u32 seen_refusals;   /* refusal_gen when this socket last checked */
	__u32 flags;           /* SOCK_* */
	__u32 probation_ms;    /* when its probation began (probation_clock) */
};

/* Why a socket takes its bytes over TCP only (values of refusals). Each is
 * a way of reading that tcp_bpf gets wrong for redirected bytes. */
enum refusal {
	REFUSED_RCVLOWAT = 1, /* it set SO_RCVLOWAT: tcp_bpf ignores it */
	REFUSED_FIONREAD = 2, /* it asked FIONREAD, on a kernel whose tcp_bpf can't answer */
	REFUSED_BACKLOG = 3,  /* its application fell behind (see inspect.c) */
	REFUSED_BLOCKING = 4, /* its file is blocking (see inspect.c) */
	REFUSED_SPLICE = 5,   /* it began to splice(2) from itself (see splicewatch.c) */
	/* Its probation socket fell out of probation_sockets (an LRU map),
	 * where the splice watch looks for it: a splice may have gone unseen. */
	REFUSED_UNWATCHED = 6,
};

/* Indexes into the counters map; pkg/datapath names them. */
enum counter {
	COUNTER_SOCKETS_ADDED,
	COUNTER_ADD_FAILURES,
	COUNTER_MSGS_REDIRECTED,
	COUNTER_BYTES_REDIRECTED,
	COUNTER_MSGS_PASSED,
	COUNTER_BYTES_PASSED,
	COUNTER_PAIRS_DECLINED,
	COUNTER_BLOCKING_SKIPPED,
	COUNTER_POLICY_SKIPPED,
	COUNTER_INBOUND_REFUSED,
	COUNTER_PROBATION_CONNECTIONS,
	COUNTER_PORTS_CLEARED,
	COUNTER_MAX,
};

/* The counters map has room to grow without changing its layout. */
#define COUNTER_SLOTS 32

/* Settings the loader changes at run time. */
struct settings {
	/* 0 stops all redirecting: the first step of a lossless `down`. */
	__u32 redirect_enabled;
	/* 1 pairs sockets as usual but sends every message over TCP: what the
	 * hooks alone cost, for the benchmark. */
	__u32 pass_only;
	__u32 policy;       /* POLICY_* bits */
	__u32 tuning_rules; /* how many entries of tuning_rules are in use */
};

/* settings.policy */
#define POLICY_INCLUDE_PORTS (1 << 0)      /* only ports in policy_ports */
#define POLICY_INCLUDE_CIDRS (1 << 1)      /* only peers in policy_cidrs */
#define POLICY_ACCELERATE_BLOCKING (1 << 2) /* blocking clients too */
#define POLICY_ACCELERATE_NEW_PORTS (1 << 3) /* no probation (sockops.c) */

/* Values of policy_ports and policy_cidrs. */
enum policy_verdict {
	POLICY_EXCLUDE = 1,
	POLICY_INCLUDE = 2,
};

/* An LPM trie key: IPv4 as IPv4-mapped IPv6, its prefix length + 96. */
struct cidr_key {
	__u32 prefixlen;
	__u32 addr[4];
};

#define MAX_TUNING_RULES 16
#define MAX_RULE_PORTS 8
#define MAX_RULE_CIDRS 4
#define CONGESTION_NAME_LEN 16

/* tuning_rule.set: which settings a rule applies. */
#define TUNE_SYN_RTO (1 << 0)
#define TUNE_RWND_INIT (1 << 1)
#define TUNE_SNDBUF (1 << 2)
#define TUNE_RCVBUF (1 << 3)
#define TUNE_CONGESTION (1 << 4)
#define TUNE_INIT_CWND (1 << 5)
#define TUNE_BASE_RTT (1 << 6)
#define TUNE_NEEDS_ECN (1 << 7)

/* A connection matches a rule when one of its ports is among ports (or the
 * rule lists none) and its peer is in one of cidrs (or the rule lists none).
 * The first matching rule applies. */
struct tuning_rule {
	__u32 nports;
	__u32 ncidrs;
	__u16 ports[MAX_RULE_PORTS];
	struct cidr_key cidrs[MAX_RULE_CIDRS];
	__u32 set;
	__u32 syn_rto_jiffies;
	__u32 rwnd_init; /* segments */
	__u32 sndbuf;
	__u32 rcvbuf;
	__u32 init_cwnd; /* segments */
	__u32 base_rtt_us;
	char congestion[CONGESTION_NAME_LEN];
};

/* The sockets of accelerated connections. Its size is set at load time. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u64);
} sock_hash SEC(".maps");

enum pending_stage {
	PENDING_SYN = 1,
	PENDING_CLIENT = 2,
	/* The client's entry after one of its two sockets settled the pair
	 * (compare-and-swap, so that exactly one of them does): */
	PENDING_PAIRED = 3,   /* the server is in sock_hash */
	PENDING_DECLINED = 4, /* the client sent over TCP first */
	/* The client found its server port on probation: both stay on TCP. */
	PENDING_PROBATION = 5,
};

/* Handshakes on their way to a pair (see sockops.c), valued with
 * pending_value. The SYN stage's keys carry no sequence numbers (they
 * aren't known yet). LRU: a handshake that never completes must not hold a
 * slot for ever. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct sock_key);
	__type(value, __u32);
} pending SEC(".maps");

/* A pending value: the stage in the low byte, a hash of the entry's key
 * above it. An LRU map recycles an evicted element at once, so the element
 * that a pointer from an earlier look-up points to may hold another
 * handshake by the time of a compare-and-swap: the hash tells. A value
 * without a hash is an older build's, met during an upgrade in place. */
#define PENDING_STAGE_MASK 0xff

/* A 24-bit hash of k, never 0 (an older build's value): its words folded,
 * then mixed (Fibonacci hashing). */
static __always_inline __u32 pending_hash(const struct sock_key *k)
{
	const __u32 *w = (const __u32 *)k;
	__u32 h = 0;

#pragma unroll
	for (int i = 0; i < sizeof(*k) / sizeof(__u32); i++)
		h = (h ^ w[i]) * 0x9e3779b1;
	h >>= 8;
	return h ? h : 1;
}

static __always_inline __u32 pending_value(const struct sock_key *k, __u32 stage)
{
	return pending_hash(k) << 8 | stage;
}

/* The stage of value v, read from k's entry; 0 if v is another key's. */
static __always_inline __u32 pending_stage(const struct sock_key *k, __u32 v)
{
	__u32 hash = v >> 8;

	return hash == 0 || hash == pending_hash(k) ? v & PENDING_STAGE_MASK : 0;
}

/* Moves k's entry, at *v, from stage from to stage to, unless another
 * socket moved it first (or it holds another key's handshake now). */
static __always_inline int advance_pending(const struct sock_key *k, __u32 *v, __u32 from, __u32 to)
{
	__u32 seen = *v;

	return pending_stage(k, seen) == from &&
	       __sync_val_compare_and_swap(v, seen, (seen & ~PENDING_STAGE_MASK) | to) == seen;
}

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} sock_states SEC(".maps");

/* Addresses of this host (IPv4 as IPv4-mapped IPv6), filled by the loader.
 * Loopback addresses are recognised without it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32[4]);
	__type(value, __u8);
} local_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct settings);
} settings SEC(".maps");

/* Sockets that refused redirected bytes, by their own key, and why. A
 * socket refuses when it starts to read in a way that tcp_bpf gets wrong, or
 * falls behind; its peer then sends over TCP from its next message on. That
 * is safe at any point, since the receiver reads what was redirected before
 * what comes over TCP, except for a splice reader (REFUSED_SPLICE): see
 * connection_refused in redirect.c. LRU: keys name one connection each, so
 * stale entries only take space. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct sock_key);
	__type(value, __u32);
} refusals SEC(".maps");

/* Bumped on every refusal, so that senders look refusals up only when there
 * is something new: an array lookup per message instead of a hash lookup. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} refusal_gen SEC(".maps");

/* A server port: the server's address and port, netns as in sock_key. */
struct port_key {
	__u64 netns;
	__u32 addr[4]; /* network byte order; IPv4 as IPv4-mapped IPv6 */
	__u32 port;
	__u32 pad;
};

/* Server ports whose sockets refused before, and why: their next
 * connections stay on TCP from the start (see refuse). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct port_key);
	__type(value, __u32);
} refusing_ports SEC(".maps");

/* Server ports whose probation connection ended without a sign that tcp_bpf
 * would get its reads wrong: their connections are accelerated. LRU: a port
 * that falls out goes through probation again. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct port_key);
	__type(value, __u8);
} cleared_ports SEC(".maps");

/* The server port of each probation socket, by socket cookie: how the splice
 * watch, a tracepoint program without socket storage, recognises one. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct port_key);
} probation_sockets SEC(".maps");

static __always_inline void count(enum counter c, __u64 n)
{
	__u32 key = c;
	__u64 *v = bpf_map_lookup_elem(&counters, &key);

	if (v)
		*v += n;
}

static __always_inline struct settings *get_settings(void)
{
	__u32 key = 0;

	return bpf_map_lookup_elem(&settings, &key);
}

/* The key the peer socket is stored under. */
static __always_inline void mirror_key(const struct sock_key *k, struct sock_key *m)
{
	m->netns = k->netns;
	__builtin_memcpy(m->local_ip, k->remote_ip, sizeof(m->local_ip));
	__builtin_memcpy(m->remote_ip, k->local_ip, sizeof(m->remote_ip));
	m->local_port = k->remote_port;
	m->remote_port = k->local_port;
	m->local_seq = k->remote_seq;
	m->remote_seq = k->local_seq;
	m->family = k->family;
	m->pad = 0;
}

static __always_inline __u32 *get_refusal_gen(void)
{
	__u32 key = 0;

	return bpf_map_lookup_elem(&refusal_gen, &key);
}

/* Records that the socket with key own refuses redirected bytes, unless it
 * did already; returns whether this is new. Senders notice at their next
 * message, through refusal_gen. A splice replaces an earlier reason: what
 * was redirected before waits where splice can't read it, and the upkeep
 * aborts only a splice reader whose queue nobody reads
 * (datapath.Maintainer); a peer that hasn't looked yet goes on redirecting
 * rather than leave a hole (redirect.c, connection_refused). */
static __always_inline int record_refusal(struct sock_key *own, __u32 why)
{
	__u32 *seen = bpf_map_lookup_elem(&refusals, own);
	__u32 *gen;

	if (seen) {
		if (why == REFUSED_SPLICE && *seen != why)
			*seen = why;
		return 0;
	}
	bpf_map_update_elem(&refusals, own, &why, BPF_ANY);
	gen = get_refusal_gen();
	if (gen)
		__sync_fetch_and_add(gen, 1);
	count(COUNTER_INBOUND_REFUSED, 1);
	return 1;
}

/* The server port of connection k, seen from its server (passive) or its
 * client. */
static __always_inline void server_port(const struct sock_key *k, int passive, struct port_key *port)
{
	__builtin_memset(port, 0, sizeof(*port));
	port->netns = k->netns;
	if (passive) {
		__builtin_memcpy(port->addr, k->local_ip, sizeof(port->addr));
		port->port = k->local_port;
	} else {
		__builtin_memcpy(port->addr, k->remote_ip, sizeof(port->addr));
		port->port = k->remote_port;
	}
}

/* Keeps a server port's next connections on TCP from the start, and says
 * why (refusal). The port is no longer cleared: should the mark fall out of
 * the LRU map, the port goes through probation again instead of being
 * accelerated at once. */
static __always_inline void refuse_port(const struct port_key *port, __u32 why)
{
	bpf_map_update_elem(&refusing_ports, port, &why, BPF_ANY);
	bpf_map_delete_elem(&cleared_ports, port);
}

/* Marks the server port of a refusing socket's connection, so that the
 * service's next connections stay on TCP from the start: a server's for
 * every reason but a backlog (only this connection's), a client's when it
 * splices (its server's next clients may be the same relay). */
static __always_inline void mark_server_port(struct sock_state *st, struct sock_key *own, __u32 why)
{
	int passive = st->flags & SOCK_PASSIVE;
	struct port_key port;

	if (passive ? why == REFUSED_BACKLOG : why != REFUSED_SPLICE)
		return;
	server_port(own, passive, &port);
	refuse_port(&port, why);
}

/* Milliseconds of the monotonic clock, wrapping after 49 days: enough to
 * tell how long a probation has lasted. */
static __always_inline __u32 probation_clock(void)
{
	return bpf_ktime_get_ns() / 1000000;
}

/* Ends a probation server socket's watch well, if its application read data
 * from a file seen non-blocking and nothing marked the port: the port is
 * cleared, and its later connections are accelerated. Data: copied_seq
 * starts where the peer's first byte is (its key's local_seq) and moves one
 * more for a FIN, all that a connection that carried nothing (a health
 * check) gives to read. */
static __always_inline void clear_server_port(struct sock_state *st, struct tcp_sock *tp)
{
	struct sock_key own;
	struct port_key port;
	__u8 cleared = 1;

	if (!(st->flags & SOCK_PASSIVE) || !(st->flags & SOCK_NONBLOCKING) ||
	    tp->copied_seq - st->peer.local_seq < 2)
		return;
	mirror_key(&st->peer, &own);
	server_port(&own, 1, &port);
	if (bpf_map_lookup_elem(&refusing_ports, &port) || bpf_map_lookup_elem(&cleared_ports, &port))
		return;
	bpf_map_update_elem(&cleared_ports, &port, &cleared, BPF_ANY);
	count(COUNTER_PORTS_CLEARED, 1);
}

/* Whether the probation socket with cookie is still where the splice watch
 * looks for it. If it fell out, a splice of it may have gone unseen, and its
 * server port is kept on TCP instead of being cleared. */
static __always_inline int still_watched(struct sock_state *st, __u64 cookie)
{
	struct sock_key own;
	struct port_key port;

	if (bpf_map_lookup_elem(&probation_sockets, &cookie))
		return 1;
	mirror_key(&st->peer, &own);
	server_port(&own, st->flags & SOCK_PASSIVE, &port);
	refuse_port(&port, REFUSED_UNWATCHED);
	return 0;
}

/* Whether the socket with state st redirects to a peer that splices: it
 * goes on doing so (see connection_refused in redirect.c), because splice
 * would read what it sent over TCP ahead of what it redirected, a hole. */
static __always_inline int redirects_to_splicer(struct sock_state *st)
{
	__u32 *why = bpf_map_lookup_elem(&refusals, &st->peer);

	return st->mode == MODE_REDIRECT && why && *why == REFUSED_SPLICE;
}

/* Puts the connection of the socket with state st back on TCP, both ways:
 * its peer sends over TCP from its next message on (it finds the refusal),
 * and so does this socket, unless it redirects to a splice reader. Once
 * both queues are read, `sockredir daemon` takes the two sockets out of
 * sock_hash (datapath.Maintainer), and they are plain TCP sockets again. A
 * probation socket is on TCP already: its server port stays there. */
static __always_inline void refuse(struct sock_state *st, __u32 why)
{
	struct sock_key own;

	if (!redirects_to_splicer(st))
		st->mode = MODE_PASS;
	mirror_key(&st->peer, &own);
	if ((st->flags & SOCK_PROBATION) || record_refusal(&own, why))
		mark_server_port(st, &own, why);
}

/* Looks at a probation server socket's file, once its application has it:
 * a port whose server reads blocking (tcp_bpf can fail that with EAGAIN)
 * stays on TCP. */
static __always_inline void note_file_mode(struct sock_state *st, struct tcp_sock *tp, struct settings *s)
{
	long flags = file_flags((struct sock *)tp);

	if (!(st->flags & SOCK_PASSIVE) || flags < 0)
		return;
	if ((flags & O_NONBLOCK) || (s->policy & POLICY_ACCELERATE_BLOCKING))
		st->flags |= SOCK_NONBLOCKING;
	else
		refuse(st, REFUSED_BLOCKING);
}

#endif /* __SOCKREDIR_H */
