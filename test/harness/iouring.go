package harness

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The parts of io_uring's ABI (include/uapi/linux/io_uring.h) that one
// IORING_OP_SPLICE needs.
const (
	ioringOpSplice        = 30
	ioringRegisterFiles   = 2
	spliceFFdInFixed      = 1 << 31 // splice_fd_in is an index into the registered files
	ioringEnterGetEvents  = 1
	ioringFeatSingleMmap  = 1
	ioringOffSQRing       = 0
	ioringOffSQEs         = 0x10000000
	ioringSQESize         = 64
	ioringCQESize         = 16
	ioringParamsSize      = 120
	ioringSQOffsetsOffset = 40 // of struct io_sqring_offsets in io_uring_params
	ioringCQOffsetsOffset = 80
)

// ioUringSplice moves up to n bytes from c into the pipe end w with one
// IORING_OP_SPLICE on a ring of its own, as a reader built on io_uring
// does: 0 is EOF, EINVAL says that c can't be spliced.
func ioUringSplice(c *net.TCPConn, w, n int) (int64, error) {
	return ioUringSpliceFrom(c, w, n, false)
}

// ioUringFixedSplice is ioUringSplice with c registered in the ring
// (IORING_REGISTER_FILES), as readers that register their sockets do: the
// request names it by its index there.
func ioUringFixedSplice(c *net.TCPConn, w, n int) (int64, error) {
	return ioUringSpliceFrom(c, w, n, true)
}

func ioUringSpliceFrom(c *net.TCPConn, w, n int, registered bool) (int64, error) {
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		// c is non-blocking, so its splice fails with EAGAIN until there
		// is something to read.
		if err := waitReadable(c, max(time.Until(deadline), time.Millisecond)); err != nil {
			return 0, fmt.Errorf("io_uring splice: %w", err)
		}
		var moved int64
		var serr error
		if err := control(c, func(fd int) { moved, serr = ioUringSpliceOnce(fd, w, n, registered) }); err != nil {
			return 0, err
		}
		if !errors.Is(serr, unix.EAGAIN) {
			return moved, serr
		}
		// Readable for recvmsg (redirected bytes), not for splice.
		time.Sleep(10 * time.Millisecond)
	}
	return 0, errors.New("io_uring splice: readable, but splice found nothing to read for 10 s")
}

// IoUringAvailable says whether this process may set up an io_uring: a
// kernel can be built without it, or disable it (kernel.io_uring_disabled),
// and seccomp filters (Docker's default) refuse it.
func IoUringAvailable() error {
	ring, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, 1, uintptr(unsafe.Pointer(&[ioringParamsSize]byte{})), 0)
	if errno != 0 {
		return fmt.Errorf("io_uring_setup: %w", errno)
	}
	return unix.Close(int(ring))
}

// ioUringSpliceOnce sets up a ring, submits one splice from fd (registered
// in the ring first, if told) to w and waits for its completion.
func ioUringSpliceOnce(fd, w, n int, registered bool) (int64, error) {
	var params [ioringParamsSize]byte
	ring, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, 1, uintptr(unsafe.Pointer(&params[0])), 0)
	if errno != 0 {
		return 0, fmt.Errorf("io_uring_setup: %w", errno)
	}
	defer unix.Close(int(ring))
	var spliceFlags uint32
	if registered {
		files := []int32{int32(fd)}
		if _, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, ring, ioringRegisterFiles,
			uintptr(unsafe.Pointer(&files[0])), 1, 0, 0); errno != 0 {
			return 0, fmt.Errorf("io_uring_register(IORING_REGISTER_FILES): %w", errno)
		}
		fd, spliceFlags = 0, spliceFFdInFixed
	}
	u32 := func(off int) uint32 { return binary.NativeEndian.Uint32(params[off:]) }
	sqEntries, cqEntries, features := u32(0), u32(4), u32(20)
	sqTail, sqMask, sqArray := u32(ioringSQOffsetsOffset+4), u32(ioringSQOffsetsOffset+8), u32(ioringSQOffsetsOffset+24)
	cqHead, cqTail, cqMask, cqes := u32(ioringCQOffsetsOffset), u32(ioringCQOffsetsOffset+4),
		u32(ioringCQOffsetsOffset+8), u32(ioringCQOffsetsOffset+20)
	if features&ioringFeatSingleMmap == 0 {
		return 0, errors.New("io_uring without IORING_FEAT_SINGLE_MMAP (before 5.4)")
	}

	rings, err := unix.Mmap(int(ring), ioringOffSQRing, int(max(sqArray+4*sqEntries, cqes+ioringCQESize*cqEntries)),
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return 0, fmt.Errorf("mapping the io_uring rings: %w", err)
	}
	defer unix.Munmap(rings)
	sqes, err := unix.Mmap(int(ring), ioringOffSQEs, int(ioringSQESize*sqEntries),
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return 0, fmt.Errorf("mapping the io_uring submission entries: %w", err)
	}
	defer unix.Munmap(sqes)
	word := func(off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&rings[off])) }

	tail := atomic.LoadUint32(word(sqTail))
	slot := tail & atomic.LoadUint32(word(sqMask))
	sqe := sqes[slot*ioringSQESize : (slot+1)*ioringSQESize]
	clear(sqe)
	sqe[0] = ioringOpSplice
	binary.NativeEndian.PutUint32(sqe[4:], uint32(w))          // the output
	binary.NativeEndian.PutUint64(sqe[8:], ^uint64(0))         // no output offset
	binary.NativeEndian.PutUint64(sqe[16:], ^uint64(0))        // no input offset
	binary.NativeEndian.PutUint32(sqe[24:], uint32(n))         // len
	binary.NativeEndian.PutUint32(sqe[28:], spliceFlags)       // splice_flags
	binary.NativeEndian.PutUint32(sqe[44:], uint32(int32(fd))) // splice_fd_in
	*word(sqArray + 4*slot) = slot
	atomic.StoreUint32(word(sqTail), tail+1)

	// A signal (the Go runtime sends them) ends the wait early, with or
	// without EINTR: enter again until the completion is there. Asking to
	// submit again is harmless, since the kernel has taken the entry.
	head := atomic.LoadUint32(word(cqHead))
	for head == atomic.LoadUint32(word(cqTail)) {
		_, _, errno = unix.Syscall6(unix.SYS_IO_URING_ENTER, ring, 1, 1, ioringEnterGetEvents, 0, 0)
		if errno != 0 && errno != unix.EINTR {
			return 0, fmt.Errorf("io_uring_enter: %w", errno)
		}
	}
	cqe := cqes + ioringCQESize*(head&atomic.LoadUint32(word(cqMask)))
	res := int32(binary.NativeEndian.Uint32(rings[cqe+8:]))
	atomic.StoreUint32(word(cqHead), head+1)
	if res < 0 {
		return 0, syscall.Errno(-res)
	}
	return int64(res), nil
}
