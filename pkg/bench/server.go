package bench

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// streamReadSize is how much a stream receiver asks for per read(2).
const streamReadSize = 256 << 10

// Indexes of the server's own descriptors in its epoll set; connections
// come after them.
const (
	listenerIndex = 0
	stdinIndex    = 1
	firstConn     = 2
)

// serverConn is one accepted connection.
type serverConn struct {
	fd           int
	read, wrote  int // of the current request and reply (rr, crr)
	replying     bool
	waitingWrite bool
}

// server serves one workload until its stdin closes (Run closes it once the
// client has finished) and every connection has ended.
type server struct {
	j        job
	p        *poller
	listener int
	conns    []serverConn // by epoll index - firstConn; fd -1 once closed
	free     []int        // reusable indexes into conns
	open     int
	stopping bool
	buf      []byte
	reply    []byte
	clk      clock
	rep      workerReport
	// A stream's receiver measures from windowFrom, its first read at
	// least a warm-up after firstByte, to lastEnd, its last end of stream;
	// windowBytes is what it had read before windowFrom.
	firstByte   int64
	windowFrom  int64
	windowBytes int64
	lastEnd     int64
}

func runServer(j job, listening func(addr string) error) (*workerReport, error) {
	ln, addr, err := listenSocket(j.Network, j.Address)
	if err != nil {
		return nil, err
	}
	defer unix.Close(ln)
	p, err := newPoller()
	if err != nil {
		return nil, err
	}
	defer p.close()
	if err := p.add(ln, listenerIndex, unix.EPOLLIN); err != nil {
		return nil, err
	}
	if err := p.add(unix.Stdin, stdinIndex, unix.EPOLLIN); err != nil {
		return nil, err
	}
	s := &server{j: j, p: p, listener: ln, clk: newClock(), reply: make([]byte, j.Workload.Size)}
	if j.Workload.Kind == Stream {
		s.buf = make([]byte, streamReadSize)
	} else {
		s.buf = make([]byte, j.Workload.Size)
	}
	defer func() {
		for _, c := range s.conns {
			if c.fd >= 0 {
				unix.Close(c.fd)
			}
		}
	}()
	if err := listening(addr); err != nil {
		return nil, err
	}
	deadline := s.clk.now() + int64(j.Timeout)
	for !s.stopping || s.open > 0 {
		if s.clk.now() > deadline {
			return nil, fmt.Errorf("still serving %d connection(s) at the deadline", s.open)
		}
		events, err := p.wait(100 * time.Millisecond)
		if err != nil {
			return nil, err
		}
		for _, ev := range events {
			if err := s.handle(int(ev.Fd), ev.Events); err != nil {
				return nil, err
			}
		}
	}
	if j.Workload.Kind == Stream && s.windowBytes > 0 {
		s.rep.WindowNanos = s.lastEnd - s.windowFrom
		s.rep.WindowBytes = s.rep.BytesReceived - s.windowBytes
	}
	return &s.rep, nil
}

func (s *server) handle(index int, events uint32) error {
	switch index {
	case listenerIndex:
		return s.accept()
	case stdinIndex:
		// Run closed stdin: the client is done. Connections still in
		// the accept queue are served before stopping.
		s.stopping = true
		if err := s.p.remove(unix.Stdin); err != nil {
			return err
		}
		return s.accept()
	}
	i := index - firstConn
	if events&unix.EPOLLOUT != 0 && s.conns[i].waitingWrite {
		if err := s.sendReply(i); err != nil {
			return err
		}
	}
	if events&(unix.EPOLLIN|unix.EPOLLHUP|unix.EPOLLERR) == 0 || s.conns[i].fd < 0 {
		return nil
	}
	if s.j.Workload.Kind == Stream {
		return s.readStream(i)
	}
	return s.readRequest(i)
}

func (s *server) accept() error {
	for {
		fd, _, err := unix.Accept4(s.listener, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		if errors.Is(err, unix.EAGAIN) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("accept: %w", err)
		}
		if s.j.Network == "tcp" && s.j.Workload.Kind != Stream {
			unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
		}
		i := len(s.conns)
		if n := len(s.free); n > 0 {
			i, s.free = s.free[n-1], s.free[:n-1]
			s.conns[i] = serverConn{fd: fd}
		} else {
			s.conns = append(s.conns, serverConn{fd: fd})
		}
		s.open++
		if err := s.p.add(fd, firstConn+i, unix.EPOLLIN); err != nil {
			return err
		}
	}
}

func (s *server) closeConn(i int) {
	unix.Close(s.conns[i].fd)
	s.conns[i].fd = -1
	s.free = append(s.free, i)
	s.open--
	s.rep.Connections++
}

// readRequest reads the rest of a request and, once it is whole, replies
// with as many bytes. The end of the stream closes the connection.
func (s *server) readRequest(i int) error {
	c := &s.conns[i]
	size := s.j.Workload.Size
	if c.replying {
		return nil // the client sends nothing before it has the reply
	}
	n, err := unix.Read(c.fd, s.buf[:size-c.read])
	if errors.Is(err, unix.EAGAIN) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if n == 0 {
		if c.read != 0 {
			return fmt.Errorf("the client closed after %d of %d request bytes", c.read, size)
		}
		s.closeConn(i)
		return nil
	}
	c.read += n
	s.rep.BytesReceived += int64(n)
	if c.read < size {
		return nil
	}
	c.read, c.wrote, c.replying = 0, 0, true
	return s.sendReply(i)
}

// sendReply writes what is left of the reply; crr closes after it.
func (s *server) sendReply(i int) error {
	c := &s.conns[i]
	for c.wrote < len(s.reply) {
		n, err := unix.Write(c.fd, s.reply[c.wrote:])
		if errors.Is(err, unix.EAGAIN) {
			if !c.waitingWrite {
				c.waitingWrite = true
				return s.p.modify(c.fd, firstConn+i, unix.EPOLLIN|unix.EPOLLOUT)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("write: %w", err)
		}
		c.wrote += n
		s.rep.BytesSent += int64(n)
	}
	c.replying = false
	if s.j.Workload.Kind == ConnectRequestClose {
		s.closeConn(i)
		return nil
	}
	if c.waitingWrite {
		c.waitingWrite = false
		return s.p.modify(c.fd, firstConn+i, unix.EPOLLIN)
	}
	return nil
}

// readStream reads what is there, noting the first read after the warm-up
// for the throughput window.
func (s *server) readStream(i int) error {
	c := &s.conns[i]
	for {
		n, err := unix.Read(c.fd, s.buf)
		if errors.Is(err, unix.EAGAIN) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
		if n == 0 {
			s.lastEnd = s.clk.now()
			s.closeConn(i)
			return nil
		}
		s.rep.BytesReceived += int64(n)
		if s.windowBytes > 0 {
			continue
		}
		now := s.clk.now()
		if s.firstByte == 0 {
			s.firstByte = now
		}
		if now >= s.firstByte+int64(s.j.Warmup) {
			s.windowFrom, s.windowBytes = now, s.rep.BytesReceived
		}
	}
}
