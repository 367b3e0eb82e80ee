// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* cgroup/setsockopt program: notices a socket asking for SO_RCVLOWAT.
 *
 * tcp_bpf reports a socket readable as soon as any redirected byte waits,
 * whatever its SO_RCVLOWAT, so the connection of a socket that sets it goes
 * back to TCP (refuse). A socket that set it before it connected is never
 * paired (sockops.c). The option itself always goes through unchanged. */
#include "sockredir.h"

#define SOL_SOCKET 1
#define SO_RCVLOWAT 18
#define PAGE_SIZE 4096

SEC("cgroup/setsockopt")
int sockredir_setsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	int *lowat = ctx->optval;
	struct sock_state *st;

	if (ctx->level == SOL_SOCKET && ctx->optname == SO_RCVLOWAT && sk &&
	    (void *)(lowat + 1) <= ctx->optval_end && *lowat > 1) {
		st = bpf_sk_storage_get(&sock_states, sk, 0, 0);
		if (st)
			refuse(st, REFUSED_RCVLOWAT);
	}
	/* Options longer than a page reach the program cut short; optlen 0
	 * tells the kernel to use the application's own buffer. */
	if (ctx->optlen > PAGE_SIZE)
		ctx->optlen = 0;
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
