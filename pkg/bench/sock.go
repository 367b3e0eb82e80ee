package bench

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The workers use raw non-blocking sockets and epoll on one locked thread,
// as event-loop servers (nginx, redis, haproxy) do: the Go netpoller would
// add its own wakeups to every configuration alike and hide the difference.
// Non-blocking matters for sockredir too: it leaves blocking clients on TCP.

// listenSocket listens on address ("127.0.0.1:0", or "@name" for an
// abstract AF_UNIX socket) and returns the address clients dial.
func listenSocket(network, address string) (fd int, dial string, err error) {
	sa, family, err := sockaddr(network, address)
	if err != nil {
		return -1, "", err
	}
	fd, err = unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, "", fmt.Errorf("socket: %w", err)
	}
	if family != unix.AF_UNIX {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		return -1, "", fmt.Errorf("bind %s: %w", address, err)
	}
	if err := unix.Listen(fd, 4096); err != nil {
		unix.Close(fd)
		return -1, "", fmt.Errorf("listen: %w", err)
	}
	if family == unix.AF_UNIX {
		return fd, address, nil
	}
	bound, err := unix.Getsockname(fd)
	if err != nil {
		unix.Close(fd)
		return -1, "", err
	}
	in4 := bound.(*unix.SockaddrInet4)
	return fd, netip.AddrPortFrom(netip.AddrFrom4(in4.Addr), uint16(in4.Port)).String(), nil
}

// startConnect opens a non-blocking socket and starts connecting it; the
// connection is usable once the socket is writable and connectError is nil.
// ok is false when an AF_UNIX listener's backlog is full: try again later.
func startConnect(network, address string, noDelay bool) (fd int, ok bool, err error) {
	sa, family, err := sockaddr(network, address)
	if err != nil {
		return -1, false, err
	}
	fd, err = unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, false, fmt.Errorf("socket: %w", err)
	}
	if noDelay && family != unix.AF_UNIX {
		unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	}
	err = unix.Connect(fd, sa)
	switch {
	case err == nil, errors.Is(err, unix.EINPROGRESS):
		return fd, true, nil
	case errors.Is(err, unix.EAGAIN):
		unix.Close(fd)
		return -1, false, nil
	default:
		unix.Close(fd)
		return -1, false, fmt.Errorf("connect %s: %w", address, err)
	}
}

// connectError is the outcome of a connect that startConnect began.
func connectError(fd int) error {
	soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return err
	}
	if soErr != 0 {
		return fmt.Errorf("connect: %w", unix.Errno(soErr))
	}
	return nil
}

// connectAll opens n connections and waits until all are established.
func connectAll(network, address string, n int, noDelay bool, timeout time.Duration) ([]int, error) {
	p, err := newPoller()
	if err != nil {
		return nil, err
	}
	defer p.close()
	fds := make([]int, 0, n)
	fail := func(err error) ([]int, error) {
		closeAll(fds)
		return nil, err
	}
	deadline := time.Now().Add(timeout)
	for len(fds) < n {
		if time.Now().After(deadline) {
			return fail(fmt.Errorf("connecting to %s: %d of %d connections after %v", address, len(fds), n, timeout))
		}
		fd, ok, err := startConnect(network, address, noDelay)
		if err != nil {
			return fail(err)
		}
		if !ok {
			time.Sleep(time.Millisecond)
			continue
		}
		fds = append(fds, fd)
		if err := p.add(fd, len(fds)-1, unix.EPOLLOUT); err != nil {
			return fail(err)
		}
	}
	for pending := n; pending > 0; {
		if time.Now().After(deadline) {
			return fail(fmt.Errorf("connecting to %s: %d connections still pending after %v", address, pending, timeout))
		}
		events, err := p.wait(100 * time.Millisecond)
		if err != nil {
			return fail(err)
		}
		for _, ev := range events {
			fd := fds[ev.Fd]
			if err := connectError(fd); err != nil {
				return fail(err)
			}
			if err := p.remove(fd); err != nil {
				return fail(err)
			}
			pending--
		}
	}
	return fds, nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

func sockaddr(network, address string) (unix.Sockaddr, int, error) {
	switch network {
	case "unix":
		if !strings.HasPrefix(address, "@") {
			return nil, 0, fmt.Errorf("AF_UNIX address %q is not abstract (@name)", address)
		}
		return &unix.SockaddrUnix{Name: address}, unix.AF_UNIX, nil
	case "tcp":
		ap, err := netip.ParseAddrPort(address)
		if err != nil || !ap.Addr().Is4() {
			return nil, 0, fmt.Errorf("TCP address %q is not IPv4 address:port", address)
		}
		return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}, unix.AF_INET, nil
	}
	return nil, 0, fmt.Errorf("unknown network %q", network)
}

// poller is a level-triggered epoll set whose events carry an index chosen
// by the caller (in EpollEvent.Fd), not the descriptor.
type poller struct {
	fd     int
	events []unix.EpollEvent
}

func newPoller() (*poller, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create: %w", err)
	}
	return &poller{fd: fd, events: make([]unix.EpollEvent, 256)}, nil
}

func (p *poller) add(fd, index int, events uint32) error {
	ev := unix.EpollEvent{Events: events, Fd: int32(index)}
	if err := unix.EpollCtl(p.fd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return fmt.Errorf("epoll_ctl add: %w", err)
	}
	return nil
}

func (p *poller) modify(fd, index int, events uint32) error {
	ev := unix.EpollEvent{Events: events, Fd: int32(index)}
	if err := unix.EpollCtl(p.fd, unix.EPOLL_CTL_MOD, fd, &ev); err != nil {
		return fmt.Errorf("epoll_ctl mod: %w", err)
	}
	return nil
}

func (p *poller) remove(fd int) error {
	if err := unix.EpollCtl(p.fd, unix.EPOLL_CTL_DEL, fd, nil); err != nil {
		return fmt.Errorf("epoll_ctl del: %w", err)
	}
	return nil
}

// wait returns the ready events, or none after timeout.
//
// It is a raw system call: through the runtime's blocking-syscall path,
// every wait that sleeps longer than a scheduler tick would hand the
// thread's P to another thread and take it back (futex wake-ups, several
// microseconds per message). A worker has a single goroutine, so nothing
// waits for the P; the runtime's preemption signal interrupts the wait
// (EINTR) when the garbage collector needs the thread.
func (p *poller) wait(timeout time.Duration) ([]unix.EpollEvent, error) {
	for {
		n, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(p.fd), uintptr(unsafe.Pointer(&p.events[0])),
			uintptr(len(p.events)), uintptr(timeout.Milliseconds()), 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return nil, fmt.Errorf("epoll_wait: %w", errno)
		}
		return p.events[:n], nil
	}
}

func (p *poller) close() { unix.Close(p.fd) }

// clock reads nanoseconds since it was made, from Go's vDSO-backed
// monotonic clock: cheap enough to read on every message.
type clock struct{ origin time.Time }

func newClock() clock { return clock{origin: time.Now()} }

func (c clock) now() int64 { return int64(time.Since(c.origin)) }
