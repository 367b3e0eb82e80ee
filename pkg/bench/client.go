package bench

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// connectTimeout bounds how long workers wait for connections to be set up.
const connectTimeout = 10 * time.Second

// drainTimeout bounds how long a client waits, after the measured window,
// for the replies still on their way.
const drainTimeout = 5 * time.Second

// latencies collects per-operation latencies of the measured window.
type latencies []time.Duration

func (l latencies) fill(rep *workerReport) {
	if len(l) == 0 {
		return
	}
	slices.Sort(l)
	rep.Ops = int64(len(l))
	rep.P50 = percentile(l, 50)
	rep.P99 = percentile(l, 99)
}

// rrConn is one request/response connection of a client.
type rrConn struct {
	fd           int
	wrote, read  int   // of the current request and reply
	began        int64 // when the current request began
	waitingWrite bool  // the request is partly written: EPOLLOUT is on
	finished     bool
}

// runRRClient keeps one request outstanding on each connection: write a
// message, read the reply, repeat.
func runRRClient(j job) (*workerReport, error) {
	w := j.Workload
	fds, err := connectAll(j.Network, j.Address, w.Conns, true, connectTimeout)
	if err != nil {
		return nil, err
	}
	defer closeAll(fds)
	p, err := newPoller()
	if err != nil {
		return nil, err
	}
	defer p.close()
	conns := make([]rrConn, len(fds))
	for i, fd := range fds {
		conns[i].fd = fd
		if err := p.add(fd, i, unix.EPOLLIN); err != nil {
			return nil, err
		}
	}
	msg := make([]byte, w.Size)
	buf := make([]byte, w.Size)
	rep := &workerReport{}
	lat := make(latencies, 0, 1<<16)
	clk := newClock()

	send := func(i int) error {
		c := &conns[i]
		for c.wrote < len(msg) {
			n, err := unix.Write(c.fd, msg[c.wrote:])
			if errors.Is(err, unix.EAGAIN) {
				if !c.waitingWrite {
					c.waitingWrite = true
					return p.modify(c.fd, i, unix.EPOLLIN|unix.EPOLLOUT)
				}
				return nil
			}
			if err != nil {
				return fmt.Errorf("write: %w", err)
			}
			c.wrote += n
			rep.BytesSent += int64(n)
		}
		if c.waitingWrite {
			c.waitingWrite = false
			return p.modify(c.fd, i, unix.EPOLLIN)
		}
		return nil
	}

	measureFrom, stopAt := j.window(clk.now())
	for i := range conns {
		conns[i].began = clk.now()
		if err := send(i); err != nil {
			return nil, err
		}
	}
	for active := len(conns); active > 0; {
		if clk.now() > stopAt+int64(drainTimeout) {
			return nil, fmt.Errorf("%d connection(s) still waiting for a reply %v after the end", active, drainTimeout)
		}
		events, err := p.wait(100 * time.Millisecond)
		if err != nil {
			return nil, err
		}
		for _, ev := range events {
			i := int(ev.Fd)
			c := &conns[i]
			if ev.Events&unix.EPOLLOUT != 0 && c.waitingWrite {
				if err := send(i); err != nil {
					return nil, err
				}
			}
			if ev.Events&(unix.EPOLLIN|unix.EPOLLHUP|unix.EPOLLERR) == 0 || c.finished {
				continue
			}
			n, err := unix.Read(c.fd, buf[:w.Size-c.read])
			if errors.Is(err, unix.EAGAIN) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("read: %w", err)
			}
			if n == 0 {
				return nil, fmt.Errorf("the server closed a connection after %d of %d reply bytes", c.read, w.Size)
			}
			c.read += n
			rep.BytesReceived += int64(n)
			if c.read < w.Size {
				continue
			}
			now := clk.now()
			if c.began >= measureFrom && now <= stopAt {
				lat = append(lat, time.Duration(now-c.began))
			}
			if now >= stopAt {
				c.finished = true
				active--
				continue
			}
			c.wrote, c.read, c.began = 0, 0, now
			if err := send(i); err != nil {
				return nil, err
			}
		}
	}
	rep.Connections = int64(len(conns))
	lat.fill(rep)
	return rep, nil
}

// crrSlot is one of a client's concurrent connect-request-close loops.
type crrSlot struct {
	fd         int // -1 between connections
	connecting bool
	wrote      int
	read       int
	began      int64
}

// runCRRClient runs Conns loops of: connect, send a message, read the reply
// until the server closes, close.
func runCRRClient(j job) (*workerReport, error) {
	w := j.Workload
	p, err := newPoller()
	if err != nil {
		return nil, err
	}
	defer p.close()
	slots := make([]crrSlot, w.Conns)
	for i := range slots {
		slots[i].fd = -1
	}
	defer func() {
		for _, s := range slots {
			if s.fd >= 0 {
				unix.Close(s.fd)
			}
		}
	}()
	msg := make([]byte, w.Size)
	buf := make([]byte, w.Size+1) // one more, to see an over-long reply
	rep := &workerReport{}
	lat := make(latencies, 0, 1<<16)
	clk := newClock()
	measureFrom, stopAt := j.window(clk.now())

	// open starts slot i's next connection; a full AF_UNIX backlog makes
	// it wait for the next round of the loop.
	open := func(i int) error {
		s := &slots[i]
		fd, ok, err := startConnect(j.Network, j.Address, true)
		if err != nil || !ok {
			return err
		}
		*s = crrSlot{fd: fd, connecting: true, began: clk.now()}
		return p.add(fd, i, unix.EPOLLOUT)
	}
	finish := func(i int) {
		unix.Close(slots[i].fd)
		slots[i].fd = -1
	}

	for active := len(slots); active > 0; {
		now := clk.now()
		if now > stopAt+int64(drainTimeout) {
			return nil, fmt.Errorf("%d connection(s) unfinished %v after the end", active, drainTimeout)
		}
		for i := range slots {
			if slots[i].fd < 0 && now < stopAt {
				if err := open(i); err != nil {
					return nil, err
				}
			}
		}
		if now >= stopAt {
			active = 0
			for _, s := range slots {
				if s.fd >= 0 {
					active++
				}
			}
			if active == 0 {
				break
			}
		}
		events, err := p.wait(10 * time.Millisecond)
		if err != nil {
			return nil, err
		}
		for _, ev := range events {
			i := int(ev.Fd)
			s := &slots[i]
			if s.connecting {
				if err := connectError(s.fd); err != nil {
					return nil, err
				}
				s.connecting = false
			}
			// The socket waits for EPOLLOUT until the request is written,
			// then for EPOLLIN.
			if s.wrote < len(msg) {
				n, err := unix.Write(s.fd, msg[s.wrote:])
				if err != nil && !errors.Is(err, unix.EAGAIN) {
					return nil, fmt.Errorf("write: %w", err)
				}
				if n > 0 {
					s.wrote += n
					rep.BytesSent += int64(n)
				}
				if s.wrote == len(msg) {
					if err := p.modify(s.fd, i, unix.EPOLLIN); err != nil {
						return nil, err
					}
				}
				continue
			}
			if ev.Events&(unix.EPOLLIN|unix.EPOLLHUP|unix.EPOLLERR) == 0 {
				continue
			}
			n, err := unix.Read(s.fd, buf[s.read:])
			if errors.Is(err, unix.EAGAIN) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("read: %w", err)
			}
			s.read += n
			rep.BytesReceived += int64(n)
			if s.read > w.Size {
				return nil, fmt.Errorf("the reply is longer than the %d bytes sent", w.Size)
			}
			if n > 0 {
				continue
			}
			if s.read != w.Size {
				return nil, fmt.Errorf("the server closed after %d of %d reply bytes", s.read, w.Size)
			}
			done := clk.now()
			if s.began >= measureFrom && done <= stopAt {
				lat = append(lat, time.Duration(done-s.began))
			}
			rep.Connections++
			finish(i)
		}
	}
	lat.fill(rep)
	return rep, nil
}

// runStreamClient writes to every connection as fast as they take it until
// the end of the window, then half-closes them. The receiver measures.
func runStreamClient(j job) (*workerReport, error) {
	w := j.Workload
	fds, err := connectAll(j.Network, j.Address, w.Conns, false, connectTimeout)
	if err != nil {
		return nil, err
	}
	defer closeAll(fds)
	src, err := newStreamSource(w)
	if err != nil {
		return nil, err
	}
	defer src.close()
	p, err := newPoller()
	if err != nil {
		return nil, err
	}
	defer p.close()
	for i, fd := range fds {
		if err := p.add(fd, i, unix.EPOLLOUT); err != nil {
			return nil, err
		}
	}
	rep := &workerReport{}
	clk := newClock()
	_, stopAt := j.window(clk.now())
	for clk.now() < stopAt {
		events, err := p.wait(10 * time.Millisecond)
		if err != nil {
			return nil, err
		}
		for _, ev := range events {
			fd := fds[ev.Fd]
			// A bounded burst per connection keeps many connections fair;
			// the clock is checked after every write.
			for range 64 {
				n, err := src.send(fd)
				if errors.Is(err, unix.EAGAIN) {
					break
				}
				if err != nil {
					return nil, fmt.Errorf("%s: %w", w.Method, err)
				}
				rep.BytesSent += int64(n)
				if clk.now() >= stopAt {
					break
				}
			}
		}
	}
	for _, fd := range fds {
		if err := unix.Shutdown(fd, unix.SHUT_WR); err != nil {
			return nil, fmt.Errorf("shutdown: %w", err)
		}
	}
	rep.Connections = int64(len(fds))
	return rep, nil
}

// streamSource is what a stream's sender writes: a buffer, or a memfd for
// sendfile(2) that it cycles through.
type streamSource struct {
	size   int
	buf    []byte
	memfd  int
	offset int64
	length int64
}

// sendfileFileSize is the memfd a sendfile stream reads from, so that
// consecutive sendfile calls read different pages.
const sendfileFileSize = 8 << 20

func newStreamSource(w Workload) (*streamSource, error) {
	s := &streamSource{size: w.Size, memfd: -1}
	if w.Method != Sendfile {
		s.buf = make([]byte, w.Size)
		for i := range s.buf {
			s.buf[i] = byte(i)
		}
		return s, nil
	}
	fd, err := unix.MemfdCreate("sockredir-bench", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	s.memfd, s.length = fd, max(sendfileFileSize, int64(w.Size))
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i)
	}
	for off := int64(0); off < s.length; off += int64(len(chunk)) {
		if _, err := unix.Pwrite(fd, chunk[:min(int64(len(chunk)), s.length-off)], off); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("filling the memfd: %w", err)
		}
	}
	return s, nil
}

func (s *streamSource) send(fd int) (int, error) {
	if s.memfd < 0 {
		return unix.Write(fd, s.buf)
	}
	if s.offset+int64(s.size) > s.length {
		s.offset = 0
	}
	return unix.Sendfile(fd, s.memfd, &s.offset, s.size)
}

func (s *streamSource) close() {
	if s.memfd >= 0 {
		unix.Close(s.memfd)
	}
}
