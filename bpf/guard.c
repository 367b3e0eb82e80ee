// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* BPF LSM programs that keep readers that tcp_bpf gets wrong away from
 * redirected bytes.
 *
 * The splice guard makes splice(2), sendfile(2) and io_uring's splice fail
 * with EINVAL when they would read from one of sockredir's sockets.
 *
 * Redirected bytes wait in the socket's psock queue, which only recvmsg reads;
 * tcp_splice_read reads the TCP receive queue alone, so a splice reader would
 * see none of them and then a clean EOF. EINVAL is what splice returns for a
 * file that can't be spliced, and readers such as Go's io.Copy then fall back
 * to read(2). vfs_splice_read, like vfs_read, asks security_file_permission
 * first; the system call, or the io_uring request, tells the two apart.
 * Kernels that refuse BPF LSM programs can't have this guard: see
 * docs/correctness.md.
 *
 * A probation socket (sockops.c) is plain TCP: its splice goes through, and
 * its server port stays on TCP, so that the service keeps its zero-copy
 * reads. */
#include "sockredir.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#define EINVAL 22

static __always_inline int is_splice_syscall(void)
{
	struct pt_regs___x86 *x86 = (void *)bpf_task_pt_regs(bpf_get_current_task_btf());
	struct pt_regs___arm64 *arm64 = (void *)x86;

	if (bpf_core_field_exists(x86->orig_ax)) {
		long nr = BPF_CORE_READ(x86, orig_ax);
		return nr == 275 /* splice */ || nr == 40 /* sendfile */;
	}
	if (bpf_core_field_exists(arm64->syscallno)) {
		int nr = BPF_CORE_READ(arm64, syscallno);
		return nr == 76 /* splice */ || nr == 71 /* sendfile */;
	}
	return 0;
}

/* io_uring runs every IORING_OP_SPLICE on one of its workers (the request
 * is forced async), which says which request it is running. */
static __always_inline int is_io_uring_splice(struct task_struct *worker_task)
{
	struct io_worker *worker;
	struct io_wq_work *work;
	struct io_kiocb *req;

	if (!bpf_core_type_exists(struct io_kiocb)) /* a kernel without io_uring */
		return 0;
	worker = BPF_CORE_READ(worker_task, worker_private);
	work = BPF_CORE_READ(worker, cur_work);
	if (!work)
		return 0;
	req = (void *)work - bpf_core_field_offset(struct io_kiocb, work);
	return BPF_CORE_READ(req, opcode) == IORING_OP_SPLICE;
}

/* An io_uring worker is no system call: on x86 it keeps the registers of
 * the task that created it, whatever call that task was in. */
static __always_inline int is_splice_read(void)
{
	struct task_struct *task = bpf_get_current_task_btf();

	return task->flags & PF_IO_WORKER ? is_io_uring_splice(task) : is_splice_syscall();
}

/* Whether sk is in a sockmap (its psock is in sk_user_data). A socket that
 * sock_ops took out again keeps its sock_states. */
static __always_inline int in_sockmap(struct sock *sk)
{
	return sk && sk->sk_user_data;
}

/* The state of one of sockredir's sockets that tcp_bpf reads (in sockmap) or
 * that is on probation; NULL for any other socket. */
static __always_inline struct sock_state *watched_state(struct file *file)
{
	struct socket *sock = bpf_sock_from_file(file);
	struct sock_state *st;
	struct sock *sk;

	if (!sock)
		return 0;
	sk = sock->sk; /* a BTF pointer, as bpf_sk_storage_get needs */
	if (!sk)
		return 0;
	st = bpf_sk_storage_get(&sock_states, sk, 0, 0);
	if (!st || !(in_sockmap(sk) || (st->flags & SOCK_PROBATION)))
		return 0;
	return st;
}

SEC("lsm/file_permission")
int BPF_PROG(sockredir_splice_guard, struct file *file, int mask, int ret)
{
	struct sock_state *st;

	/* Every read of every file passes here: the system call is the
	 * cheapest thing to look at first. */
	if (ret || !(mask & MAY_READ) || !is_splice_read())
		return ret;
	st = watched_state(file);
	if (!st)
		return 0;
	if (!(st->flags & SOCK_PROBATION))
		return -EINVAL;
	refuse(st, REFUSED_SPLICE);
	return 0;
}

/* The FIONREAD guard, attached only on kernels whose tcp_bpf has no ioctl
 * (6.1): there FIONREAD counts only what came over TCP. A socket that asks
 * takes its bytes over TCP from then on, and its server port's next
 * connections from the start (refuse). Bytes redirected before the first
 * FIONREAD are not counted by that call: probation keeps a port's first
 * connections on TCP, so that only a port that asked nothing during its
 * probation can meet that. */
#define SIOCINQ 0x541B /* FIONREAD */

SEC("lsm/file_ioctl")
int BPF_PROG(sockredir_fionread_guard, struct file *file, unsigned int cmd, unsigned long arg, int ret)
{
	struct sock_state *st;

	if (ret || cmd != SIOCINQ)
		return ret;
	st = watched_state(file);
	if (st)
		refuse(st, REFUSED_FIONREAD);
	return 0;
}

char _license[] SEC("license") = "Dual BSD/GPL";
