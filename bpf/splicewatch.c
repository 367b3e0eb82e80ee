// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The splice watch: where the kernel refuses the BPF LSM splice guard
 * (guard.c), tracepoints on splice(2), sendfile(2) and io_uring's requests
 * notice a socket of sock_hash that starts to be read that way, and record
 * it in refusals (REFUSED_SPLICE). Its server port is then marked (here, if
 * probation cleared it; else when the socket next sends, or by the upkeep's
 * inspector), so that the service's next connections stay on TCP from the
 * start.
 *
 * A tracepoint can't fail the call, and this connection can't be saved:
 * bytes redirected to the socket before its first splice, or on their way
 * to it, wait in its psock queue, which splice doesn't read. Switching the
 * peer to TCP would hand splice the bytes after them, a hole. So the peer
 * goes on redirecting, and the upkeep (datapath.Maintainer) aborts the
 * connection once its queue sits unread: both applications get an error,
 * never a hole. Without the upkeep, or if the peer closes sooner, the
 * reader gets a short stream and EOF (docs/correctness.md). Probation
 * (sockops.c) is what keeps that from happening on a port's first
 * connections: a probation socket that splices has its server port marked
 * here, while its bytes still come over TCP, which splice reads.
 *
 * Tracepoint programs get no BTF pointers and no socket storage, so
 * everything is read with CO-RE probe reads, a sock_hash socket's key comes
 * from its element, and a probation socket is found by its cookie. */
#include "sockredir.h"
#include <bpf/bpf_core_read.h>

/* sock_hash's id, set by the loader: the element to read the key from. */
const volatile __u32 sock_hash_id;

/* The maps a socket can be in that the watch looks through; sockredir's
 * sockets are in one, other tools may add theirs. */
#define MAX_SOCKET_MAPS 4

/* A syscalls:sys_enter_* tracepoint's record. */
struct syscall_enter {
	__u64 common;
	__s32 nr;
	__u32 pad;
	__u64 args[6];
};

static __always_inline struct sock *socket_of_file(struct file *file)
{
	struct socket *sock;

	if (!file || (BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return 0;
	sock = BPF_CORE_READ(file, private_data);
	return BPF_CORE_READ(sock, sk);
}

static __always_inline struct sock *socket_of_fd(__u64 fd)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = 0;

	if (fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	return socket_of_file(file);
}

/* The socket at index of the ring's registered files, if it is one. The
 * request is being submitted, under the ring's lock, which the table's
 * updates take too. */
static __always_inline struct sock *socket_of_registered_file(struct io_kiocb *req, __u32 index)
{
	struct io_ring_ctx *ctx = BPF_CORE_READ(req, ctx);
	unsigned long file_ptr = 0;

	if (bpf_core_field_exists(struct io_ring_ctx___before_6_13, nr_user_files)) {
		struct io_ring_ctx___before_6_13 *old = (void *)ctx;
		struct io_fixed_file *files = BPF_CORE_READ(old, file_table.files);

		if (index >= BPF_CORE_READ(old, nr_user_files))
			return 0;
		bpf_probe_read_kernel(&file_ptr, sizeof(file_ptr), &files[index].file_ptr);
	} else {
		struct io_rsrc_node **nodes = BPF_CORE_READ(ctx, file_table.data.nodes);
		struct io_rsrc_node *node = 0;

		if (index >= BPF_CORE_READ(ctx, file_table.data.nr))
			return 0;
		bpf_probe_read_kernel(&node, sizeof(node), &nodes[index]);
		if (!node)
			return 0;
		file_ptr = BPF_CORE_READ(node, file_ptr);
	}
	return socket_of_file((struct file *)(file_ptr & ~IO_FILE_PTR_FLAGS));
}

/* Reads the key of sk in sock_hash into key; 0 if it isn't there. */
static __always_inline int sock_hash_key(struct sock *sk, struct sock_key *key)
{
	unsigned long user_data = (unsigned long)BPF_CORE_READ(sk, sk_user_data);
	struct sk_psock *psock = (void *)(user_data & SK_USER_DATA_PTRMASK);
	struct list_head *head, *pos;

	if (!psock)
		return 0;
	head = (void *)psock + bpf_core_field_offset(struct sk_psock, link);
	pos = BPF_CORE_READ(psock, link.next);
#pragma unroll
	for (int i = 0; i < MAX_SOCKET_MAPS; i++) {
		struct sk_psock_link *link = (void *)pos; /* list is its first member */
		void *elem;

		if (!pos || pos == head)
			return 0;
		if (BPF_CORE_READ(link, map, id) == sock_hash_id) {
			elem = BPF_CORE_READ(link, link_raw);
			return elem && !bpf_probe_read_kernel(key, sizeof(*key),
							      elem + bpf_core_field_offset(struct bpf_shtab_elem, key));
		}
		pos = BPF_CORE_READ(pos, next);
	}
	return 0;
}

/* Marks the server port of the sock_hash connection key, if it can tell
 * which end is the server without the socket's storage (which a tracepoint
 * can't reach): the end whose port probation cleared. Otherwise the port is
 * marked when the splicing socket next sends, or by the upkeep; but a
 * reader that only reads, or splices once to find its EOF and closes, may
 * never send again, and without the upkeep the service's next connections
 * would lose their bytes the same way. */
static __always_inline void mark_cleared_server_port(struct sock_key *key)
{
	struct port_key port;

	server_port(key, 1, &port);
	if (!bpf_map_lookup_elem(&cleared_ports, &port)) {
		server_port(key, 0, &port);
		if (!bpf_map_lookup_elem(&cleared_ports, &port))
			return;
	}
	refuse_port(&port, REFUSED_SPLICE);
}

static __always_inline void watch(struct sock *sk)
{
	struct port_key *server;
	struct sock_key key;
	__u64 cookie;

	if (!sk)
		return;
	if (sock_hash_key(sk, &key)) {
		/* Marked also when an earlier refusal was there: a
		 * splice replaces it. */
		record_refusal(&key, REFUSED_SPLICE);
		mark_cleared_server_port(&key);
		return;
	}
	cookie = BPF_CORE_READ((struct sock_common *)sk, skc_cookie.counter);
	server = cookie ? bpf_map_lookup_elem(&probation_sockets, &cookie) : 0;
	if (server)
		refuse_port(server, REFUSED_SPLICE);
}

SEC("tracepoint/syscalls/sys_enter_splice")
int sockredir_splice_watch(struct syscall_enter *ctx)
{
	watch(socket_of_fd(ctx->args[0])); /* fd_in */
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_sendfile64")
int sockredir_sendfile_watch(struct syscall_enter *ctx)
{
	watch(socket_of_fd(ctx->args[1])); /* in_fd */
	return 0;
}

/* io_uring's splice is no system call: its requests are watched as they are
 * submitted (io_uring_submit_req, io_uring_submit_sqe before 6.4; the
 * loader attaches to whichever exists), in the submitter's task or its
 * SQPOLL thread, which shares its files, before they run. The input is a
 * descriptor, or an index among the ring's registered files. */
SEC("raw_tp/io_uring_submit_req")
int sockredir_io_uring_splice_watch(struct bpf_raw_tracepoint_args *ctx)
{
	struct io_kiocb *req = (void *)ctx->args[0];
	struct io_splice *sp;
	int fd_in;

	if (!bpf_core_type_exists(struct io_kiocb)) /* a kernel without io_uring */
		return 0;
	sp = (void *)req + bpf_core_field_offset(struct io_kiocb, cmd);
	if (BPF_CORE_READ(req, opcode) != IORING_OP_SPLICE)
		return 0;
	fd_in = BPF_CORE_READ(sp, splice_fd_in);
	if (BPF_CORE_READ(sp, flags) & SPLICE_F_FD_IN_FIXED)
		watch(socket_of_registered_file(req, fd_in));
	else
		watch(socket_of_fd(fd_in));
	return 0;
}

char _license[] SEC("license") = "Dual BSD/GPL";
