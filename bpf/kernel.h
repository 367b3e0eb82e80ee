/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The few kernel structure fields sockredir reads, declared for CO-RE:
 * preserve_access_index makes libbpf/cilium-ebpf relocate each access to the
 * running kernel's layout, so no vmlinux.h is needed. */
#ifndef __SOCKREDIR_KERNEL_H
#define __SOCKREDIR_KERNEL_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

struct inode {
	unsigned short i_mode;
} __attribute__((preserve_access_index));

struct file {
	unsigned int f_flags;
	struct inode *f_inode;
	void *private_data; /* a socket file's struct socket */
} __attribute__((preserve_access_index));

#define S_IFMT 00170000
#define S_IFSOCK 0140000

/* A task's open files: fd[i] is the file of descriptor i. */
struct fdtable {
	unsigned int max_fds;
	struct file **fd;
} __attribute__((preserve_access_index));

struct files_struct {
	struct fdtable *fdt;
} __attribute__((preserve_access_index));

struct task_struct {
	unsigned int flags;
	struct files_struct *files;
	void *worker_private; /* an io_uring worker's struct io_worker */
} __attribute__((preserve_access_index));

#define PF_IO_WORKER 0x00000010

/* An io_uring request (io_kiocb), with the command it holds: for
 * IORING_OP_SPLICE an io_splice. An io_uring worker's cur_work is the
 * io_wq_work of the request that it runs. */
struct io_wq_work {
	unsigned int flags;
} __attribute__((preserve_access_index));

struct io_worker {
	struct io_wq_work *cur_work;
} __attribute__((preserve_access_index));

struct io_cmd_data {
	struct file *file;
} __attribute__((preserve_access_index));

/* A ring's registered files (IORING_REGISTER_FILES). Each entry holds a
 * file pointer with flags in its low bits (file_ptr). Since 6.13 the table
 * is an array of resource nodes with its length; before, an array of
 * io_fixed_file, whose length is the ring's nr_user_files. */
struct io_rsrc_node {
	unsigned long file_ptr;
} __attribute__((preserve_access_index));

struct io_rsrc_data {
	unsigned int nr;
	struct io_rsrc_node **nodes;
} __attribute__((preserve_access_index));

struct io_file_table {
	struct io_rsrc_data data;
} __attribute__((preserve_access_index));

struct io_ring_ctx {
	struct io_file_table file_table;
} __attribute__((preserve_access_index));

struct io_fixed_file {
	unsigned long file_ptr;
} __attribute__((preserve_access_index));

struct io_file_table___before_6_13 {
	struct io_fixed_file *files;
} __attribute__((preserve_access_index));

struct io_ring_ctx___before_6_13 {
	struct io_file_table___before_6_13 file_table;
	unsigned int nr_user_files;
} __attribute__((preserve_access_index));

/* file_ptr's flag bits (FFS_NOWAIT, FFS_ISREG and, before 6.7, FFS_SCM). */
#define IO_FILE_PTR_FLAGS 0x7UL

struct io_kiocb {
	union {
		struct file *file;
		struct io_cmd_data cmd;
	};
	__u8 opcode;
	struct io_ring_ctx *ctx;
	struct io_wq_work work;
} __attribute__((preserve_access_index));

struct io_splice {
	int splice_fd_in;
	unsigned int flags;
} __attribute__((preserve_access_index));

#define IORING_OP_SPLICE 30
#define SPLICE_F_FD_IN_FIXED (1U << 31) /* splice_fd_in is a registered file's index */

struct sock;

struct socket {
	struct file *file;
	struct sock *sk;
} __attribute__((preserve_access_index));

struct sock {
	void *sk_user_data; /* the sk_psock, with flags in the low bits */
	struct socket *sk_socket;
	int sk_rcvlowat;
} __attribute__((preserve_access_index));

/* The system call number, on the two architectures sockredir builds for:
 * CO-RE keeps whichever field the running kernel has. */
struct pt_regs___x86 {
	unsigned long orig_ax;
} __attribute__((preserve_access_index));

struct pt_regs___arm64 {
	int syscallno;
} __attribute__((preserve_access_index));

#define MAY_READ 0x4

#define O_NONBLOCK 00004000

/* Starts with its struct sock, as every kernel socket type does. */
struct tcp_sock {
	__u32 write_seq;  /* sequence number after the last byte queued to send */
	__u32 copied_seq; /* sequence number of the next byte to read */
} __attribute__((preserve_access_index));

/* The flags of the file through which its application has sk, or -1 while
 * it has none (before accept(2) gives it one, after close(2)). */
static __always_inline long file_flags(struct sock *sk)
{
	struct socket *sock = BPF_CORE_READ(sk, sk_socket);
	struct file *file = sock ? BPF_CORE_READ(sock, file) : 0;

	return file ? BPF_CORE_READ(file, f_flags) : -1;
}

struct list_head {
	struct list_head *next, *prev;
};

/* A socket's sockmap state; ingress_msg holds redirected bytes not read yet,
 * msg_tot_len (kernels with 929e30f93125) their number. */
struct sk_psock {
	struct list_head ingress_msg;
	__u32 msg_tot_len;
	struct list_head link; /* of sk_psock_link: the maps the socket is in */
} __attribute__((preserve_access_index));

struct bpf_map {
	__u32 id;
} __attribute__((preserve_access_index));

struct sk_psock_link {
	struct list_head list;
	struct bpf_map *map;
	void *link_raw; /* for a sockhash, the socket's bpf_shtab_elem */
} __attribute__((preserve_access_index));

/* A sockhash element: key holds the map's key for the socket. */
struct bpf_shtab_elem {
	__u8 key[0];
} __attribute__((preserve_access_index));

struct sk_msg_sg {
	__u32 size;
} __attribute__((preserve_access_index));

/* One redirected message, queued on ingress_msg by its list member. */
struct sk_msg {
	struct sk_msg_sg sg;
	struct list_head list;
} __attribute__((preserve_access_index));

/* The low bits of sk_user_data are flags (SK_USER_DATA_NOCOPY, _BPF, _PSOCK). */
#define SK_USER_DATA_PTRMASK (~7UL)

struct bpf_iter_meta {
	void *seq;
} __attribute__((preserve_access_index));

typedef struct {
	__s64 counter;
} atomic64_t;

/* The start of every struct sock. */
struct sock_common {
	unsigned short skc_family;
	atomic64_t skc_cookie; /* 0 until someone asks for the socket's cookie */
} __attribute__((preserve_access_index));

/* Context of an iter/tcp program: one TCP socket of the namespace per call. */
struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
} __attribute__((preserve_access_index));

#endif /* __SOCKREDIR_KERNEL_H */
