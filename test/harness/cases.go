package harness

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Case is one way of using a socket that sockredir must not break; the
// zero-loss matrix runs each with and without acceleration.
type Case struct {
	Name   string `json:"name"`
	Bytes  int64  `json:"bytes,omitempty"`
	Target string `json:"target,omitempty"` // host:port, for cases that connect out
}

// CaseResult is what a case observed, for the test to judge.
type CaseResult struct {
	// Received is what each named receiver read, with the seed of the
	// stream it should have read.
	Received map[string]Checked `json:"received,omitempty"`
	// Errors are the errors the application saw, by who saw them.
	Errors map[string]string `json:"errors,omitempty"`
	// Values are other observations (FIONREAD, readiness, ...).
	Values map[string]int64 `json:"values,omitempty"`
	// Texts are observations that are names (a congestion control).
	Texts map[string]string `json:"texts,omitempty"`
}

// Only returns the receivers and errors of r whose names end in suffix.
func (r *CaseResult) Only(suffix string) *CaseResult {
	only := newResult()
	for who, got := range r.Received {
		if strings.HasSuffix(who, suffix) {
			only.Received[who] = got
		}
	}
	for who, err := range r.Errors {
		if strings.HasSuffix(who, suffix) {
			only.Errors[who] = err
		}
	}
	return only
}

// Checked is what a receiver read and what it should have read.
type Checked struct {
	Received
	WantSeed uint64 `json:"want_seed"`
	WantSize int64  `json:"want_size"`
}

// Intact reports whether the receiver read exactly the sender's stream.
func (c Checked) Intact() bool {
	return c.Bytes == c.WantSize && c.SHA256 == StreamSHA256(c.WantSize, c.WantSeed)
}

var cases = map[string]func(Case) (*CaseResult, error){
	"half-close-blocking-client":   halfCloseBlockingClient,
	"blocking-client-sends":        blockingClientSends,
	"splice-relay":                 spliceRelay,
	"splice-reader":                spliceReader(syscallSplice),
	"io-uring-splice-reader":       spliceReader(ioUringSplice),
	"io-uring-fixed-splice-reader": spliceReader(ioUringFixedSplice),
	"splice-before-reply":          withPair(spliceBeforeReply),
	"splice-then-fionread":         withPair(spliceThenFIONREAD),
	"lasting-connection":           lastingConnection,
	"sendfile":                     withPair(sendfileSender),
	"peek":                         withPair(peek),
	"fionread":                     fionread,
	"rcvlowat":                     rcvlowat(afterAccept),
	"rcvlowat-before-connect":      rcvlowat(beforeConnect),
	"rcvlowat-after-data":          rcvlowat(afterData),
	"abortive-close":               withPair(abortiveClose),
	"epoll-level-rdhup":            withPair(epollLevelRDHUP),
	"rcvlowat-then-fionread":       withPair(rcvlowatThenFIONREAD),
	"rcvlowat-then-splice":         withPair(rcvlowatThenSplice),
	"refusal-to-splice-reader":     withPair(refusalToSpliceReader),
	"splice-reader-during-down":    withPair(spliceReaderDuringDown),
	"reply-then-fionread":          withPair(replyThenFIONREAD),
	"blocking-server-twice":        blockingServerTwice,
	"connect-time":                 connectTime,
	"fast-open-taken":              fastOpen(true),
	"fast-open-ignored":            fastOpen(false),
	"tcp-tuning":                   tcpTuning,
	"reconnect":                    reconnect,
	"urgent-data":                  withPair(urgentData),
}

// Run runs the case in this process.
func (c *Case) Run() (*CaseResult, error) {
	fn, ok := cases[c.Name]
	if !ok {
		return nil, fmt.Errorf("no case %q", c.Name)
	}
	return fn(*c)
}

func newResult() *CaseResult {
	return &CaseResult{Received: map[string]Checked{}, Errors: map[string]string{}, Values: map[string]int64{}, Texts: map[string]string{}}
}

// withPair runs a case on a fresh loopback connection, closed afterwards.
func withPair(run func(c Case, client, server *net.TCPConn) (*CaseResult, error)) func(Case) (*CaseResult, error) {
	return func(c Case) (*CaseResult, error) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer ln.Close()
		client, server, err := connect(ln.(*net.TCPListener))
		if err != nil {
			return nil, err
		}
		defer client.Close()
		defer server.Close()
		return run(c, client, server)
	}
}

// connect returns the two ends of a fresh loopback connection to ln.
func connect(ln *net.TCPListener) (client, server *net.TCPConn, err error) {
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		return nil, nil, err
	}
	s, err := ln.Accept()
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	return c.(*net.TCPConn), s.(*net.TCPConn), nil
}

// halfCloseBlockingClient is the classic client: a blocking socket that
// sends its request, shuts down its sending side, then blocks in recv(2)
// until the server's answer ends.
func halfCloseBlockingClient(c Case) (*CaseResult, error) {
	res := newResult()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	serverDone := make(chan error, 1)
	go func() {
		s, err := ln.Accept()
		if err != nil {
			serverDone <- err
			return
		}
		defer s.Close()
		got, err := readAll(s.(*net.TCPConn), 0, 0)
		res.Received["server"] = Checked{got, 1, c.Bytes}
		if err == nil {
			time.Sleep(20 * time.Millisecond) // let the client block in recv first
			err = writeStream(s.(*net.TCPConn), c.Bytes, 2, 0)
		}
		serverDone <- err
	}()

	fd, err := dialBlocking(ln)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	if _, err := io.Copy(fdWriter(fd), io.LimitReader(rand.NewChaCha8(seedBytes(1)), c.Bytes)); err != nil {
		res.Errors["client write"] = err.Error()
	}
	unix.Shutdown(fd, unix.SHUT_WR)
	h := sha256.New()
	var n int64
	buf := make([]byte, 64<<10)
	for {
		k, err := unix.Read(fd, buf)
		if err != nil {
			res.Errors["client read"] = err.Error()
			break
		}
		if k == 0 {
			break
		}
		h.Write(buf[:k])
		n += int64(k)
	}
	res.Received["client"] = Checked{Received{hex.EncodeToString(h.Sum(nil)), n}, 2, c.Bytes}
	if err := <-serverDone; err != nil {
		res.Errors["server"] = err.Error()
	}
	return res, nil
}

// blockingServerTwice is a thread-per-connection server: a blocking
// listener, and blocking reads of each accepted socket. Two clients in turn
// send c.Bytes each, which it reads and echoes, staying connected a while.
func blockingServerTwice(c Case) (*CaseResult, error) {
	res := newResult()
	lfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0) // blocking
	if err != nil {
		return nil, err
	}
	defer unix.Close(lfd)
	if err := unix.Bind(lfd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return nil, err
	}
	if err := unix.Listen(lfd, 2); err != nil {
		return nil, err
	}
	addr, err := unix.Getsockname(lfd)
	if err != nil {
		return nil, err
	}
	target := fmt.Sprintf("127.0.0.1:%d", addr.(*unix.SockaddrInet4).Port)
	for i := range 2 {
		client, err := net.Dial("tcp", target)
		if err != nil {
			return nil, err
		}
		fd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC) // blocking
		if err != nil {
			client.Close()
			return nil, err
		}
		echoed := make(chan error, 1)
		go func() {
			buf := make([]byte, c.Bytes)
			_, err := io.ReadFull(fdReader(fd), buf)
			if err == nil {
				_, err = fdWriter(fd).Write(buf)
			}
			echoed <- err
		}()
		sent := make([]byte, c.Bytes)
		for j := range sent {
			sent[j] = byte(i + j)
		}
		got := make([]byte, c.Bytes)
		if _, err := client.Write(sent); err != nil {
			res.Errors[fmt.Sprintf("client %d", i)] = err.Error()
		} else if _, err := io.ReadFull(client, got); err != nil || string(got) != string(sent) {
			res.Errors[fmt.Sprintf("client %d", i)] = fmt.Sprintf("echo differs or failed: %v", err)
		}
		if err := <-echoed; err != nil {
			res.Errors[fmt.Sprintf("server %d", i)] = err.Error()
		}
		time.Sleep(time.Second) // for the daemon, if one runs (emulated kernels are slow)
		client.Close()
		unix.Close(fd)
	}
	return res, nil
}

type fdReader int

func (fd fdReader) Read(p []byte) (int, error) {
	n, err := unix.Read(int(fd), p)
	if n == 0 && err == nil && len(p) > 0 {
		return 0, io.EOF
	}
	return n, err
}

// blockingClientSends is a client on a blocking socket that only writes:
// c.Bytes, then it closes. (Whether it is accelerated is up to the policy's
// accelerate_blocking.)
func blockingClientSends(c Case) (*CaseResult, error) {
	res := newResult()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	fd, err := dialBlocking(ln)
	if err != nil {
		return nil, err
	}
	s, err := ln.Accept()
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	defer s.Close()
	serverDone := make(chan error, 1)
	go func() {
		got, err := readAll(s.(*net.TCPConn), 0, 0)
		res.Received["server"] = Checked{got, 1, c.Bytes}
		serverDone <- err
	}()
	_, err = io.Copy(fdWriter(fd), io.LimitReader(rand.NewChaCha8(seedBytes(1)), c.Bytes))
	unix.Close(fd)
	if err != nil {
		res.Errors["client"] = err.Error()
	}
	if err := <-serverDone; err != nil {
		res.Errors["server"] = err.Error()
	}
	return res, nil
}

// dialBlocking connects a blocking socket to ln (Go's own are non-blocking).
func dialBlocking(ln net.Listener) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

type fdWriter int

func (fd fdWriter) Write(p []byte) (int, error) { return unix.Write(int(fd), p) }

// spliceRelay is a Go proxy: io.Copy between two TCP connections, which
// moves the bytes with splice(2). client -> relay -> server, both ways; then
// a second connection through the same relay to the same server, whose
// results are named "... next connection". The client keeps its side open
// for relayHoldOpen after sending, as a client waiting for its answer does:
// where the splice guard can't load, the upkeep aborts the first connection
// meanwhile (datapath.Maintainer). Like a relay driven by epoll, it starts
// to splice from a side once that side is readable: bytes have then been
// redirected to it unless sockredir declined (splice-before-reply covers a
// splice that comes first).
func spliceRelay(c Case) (*CaseResult, error) {
	res := newResult()
	upstreamLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	defer upstreamLn.Close()
	relayLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	defer relayLn.Close()
	for _, suffix := range []string{"", " next connection"} {
		if err := relayOnce(c, res, suffix, relayLn, upstreamLn); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// relayHoldOpen is longer than the upkeep takes to abort a connection whose
// splice reader can't read what was redirected to it.
const relayHoldOpen = 2 * time.Second

// relayOnce runs one connection of spliceRelay, recording its results
// under names ending in suffix.
func relayOnce(c Case, res *CaseResult, suffix string, relayLn, upstreamLn net.Listener) error {
	var wg sync.WaitGroup
	var mu sync.Mutex
	fail := func(who string, err error) {
		if err != nil {
			mu.Lock()
			res.Errors[who+suffix] = err.Error()
			mu.Unlock()
		}
	}
	wg.Go(func() { // the relay
		down, err := relayLn.Accept()
		if err != nil {
			fail("relay accept", err)
			return
		}
		defer down.Close()
		up, err := net.Dial("tcp", upstreamLn.Addr().String())
		if err != nil {
			fail("relay dial", err)
			return
		}
		defer up.Close()
		var relay sync.WaitGroup
		copyHalf := func(dst, src *net.TCPConn) {
			err := waitReadable(src, 10*time.Second)
			if err == nil {
				_, err = io.Copy(dst, src)
			}
			fail("relay copy", err)
			dst.CloseWrite()
		}
		relay.Go(func() { copyHalf(up.(*net.TCPConn), down.(*net.TCPConn)) })
		relay.Go(func() { copyHalf(down.(*net.TCPConn), up.(*net.TCPConn)) })
		relay.Wait()
	})
	wg.Go(func() { // the server
		s, err := upstreamLn.Accept()
		if err != nil {
			fail("server accept", err)
			return
		}
		defer s.Close()
		got, err := Exchange(s.(*net.TCPConn), c.Bytes, 2)
		fail("server", err)
		mu.Lock()
		res.Received["server"+suffix] = Checked{got, 1, c.Bytes}
		mu.Unlock()
	})
	client, err := net.Dial("tcp", relayLn.Addr().String())
	if err != nil {
		return err
	}
	defer client.Close()
	got, err := (&Transfer{HoldOpen: relayHoldOpen}).exchange(client.(*net.TCPConn), c.Bytes, 1, 0)
	fail("client", err)
	wg.Wait()
	res.Received["client"+suffix] = Checked{got, 2, c.Bytes}
	return nil
}

// lastingConnection is a pool's connection to a server on c.Target: it
// exchanges c.Bytes each way, then stays open while a second connection to
// the same server comes and goes lastingWait later. The first connection's
// results are named "... first", the second's "... next".
func lastingConnection(c Case) (*CaseResult, error) {
	res := newResult()
	ln, err := net.Listen("tcp", c.Target)
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	var mu sync.Mutex
	exchange := func(name string, t *Transfer, conn *net.TCPConn, seed, want uint64) {
		got, err := t.exchange(conn, c.Bytes, seed, 0)
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			res.Errors[name] = err.Error()
		}
		res.Received[name] = Checked{got, want, c.Bytes}
	}
	pair := func(suffix string, t *Transfer, seed uint64) error {
		client, server, err := connect(ln.(*net.TCPListener))
		if err != nil {
			return err
		}
		defer client.Close()
		defer server.Close()
		var wg sync.WaitGroup
		wg.Go(func() { exchange("client"+suffix, t, client, seed, seed+1) })
		wg.Go(func() { exchange("server"+suffix, t, server, seed+1, seed) })
		wg.Wait()
		return nil
	}
	first := make(chan error, 1)
	go func() { first <- pair(" first", &Transfer{HoldOpen: 2 * lastingWait}, 70) }()
	time.Sleep(lastingWait)
	if err := pair(" next", &Transfer{}, 72); err != nil {
		return nil, err
	}
	if err := <-first; err != nil {
		return nil, err
	}
	return res, nil
}

// lastingWait is how long lastingConnection's first connection has been
// open when the second comes: longer than probation watches a connection
// before the upkeep may clear its port.
const lastingWait = 2 * time.Second

// spliceReader is a server on c.Target (default: a loopback port of its
// own) that reads with splice into a pipe, as haproxy and Go's io.Copy do,
// falling back to read(2) when splice fails with EINVAL. Its client sends
// c.Bytes and closes while the server waits 100 ms before it reads: a
// redirecting client has finished by then, so a reader that splices from an
// accelerated socket finds its EOF at once (over TCP, the client waits for
// the reader). Two connections, the second's results named "... next
// connection"; Values counts the reads that fell back.
func spliceReader(splice splicer) func(Case) (*CaseResult, error) {
	return func(c Case) (*CaseResult, error) {
		if c.Target == "" {
			c.Target = "127.0.0.1:0"
		}
		res := newResult()
		ln, err := net.Listen("tcp", c.Target)
		if err != nil {
			return nil, err
		}
		defer ln.Close()
		for i, suffix := range []string{"", " next connection"} {
			seed := uint64(60 + i)
			client, server, err := connect(ln.(*net.TCPListener))
			if err != nil {
				return nil, err
			}
			written := make(chan error, 1)
			go func() {
				written <- writeStream(client, c.Bytes, seed, 0)
				client.Close()
			}()
			time.Sleep(100 * time.Millisecond)
			got, fellBack, err := spliceAll(server, splice)
			server.Close()
			if err := <-written; err != nil {
				res.Errors["client"+suffix] = err.Error()
			}
			if err != nil {
				res.Errors["server"+suffix] = err.Error()
			}
			res.Received["server"+suffix] = Checked{got, seed, c.Bytes}
			res.Values["read fallback"+suffix] = int64(fellBack)
		}
		return res, nil
	}
}

// fastOpen is a client that puts its request in its SYN (TCP Fast Open,
// without a cookie, set for this network namespace) to a server that takes
// it (serverTakes) or ignores it, so that the client sends it again once
// connected. The server reads the 1000-byte request and answers c.Bytes;
// the client asks FIONREAD once the answer has arrived, then reads it.
func fastOpen(serverTakes bool) func(Case) (*CaseResult, error) {
	return func(c Case) (*CaseResult, error) {
		const seed = 70
		// Client on, with data without a cookie; the server's two bits
		// likewise.
		mode := "5"
		if serverTakes {
			mode = "519"
		}
		if err := os.WriteFile("/proc/sys/net/ipv4/tcp_fastopen", []byte(mode), 0); err != nil {
			return nil, err
		}
		lc := net.ListenConfig{Control: func(_, _ string, raw syscall.RawConn) error {
			var serr error
			err := raw.Control(func(fd uintptr) {
				if serverTakes {
					serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_FASTOPEN, 16)
				}
			})
			return errors.Join(err, serr)
		}}
		ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer ln.Close()
		request := bytes.Repeat([]byte{'q'}, 1000)
		client, err := dialFastOpen(ln.Addr().(*net.TCPAddr), request)
		if err != nil {
			return nil, err
		}
		defer client.Close()
		accepted, err := ln.Accept()
		if err != nil {
			return nil, err
		}
		server := accepted.(*net.TCPConn)
		defer server.Close()

		res := newResult()
		asked := make([]byte, len(request))
		if _, err := io.ReadFull(server, asked); err != nil || !bytes.Equal(asked, request) {
			res.Errors["server"] = fmt.Sprintf("request %q..., error %v", asked[:8], err)
			return res, nil
		}
		if err := writeStream(server, c.Bytes, seed, 0); err != nil {
			res.Errors["server"] = err.Error()
		}
		if err := waitReadable(client, 2*time.Second); err != nil {
			return nil, err
		}
		time.Sleep(50 * time.Millisecond) // all of it arrived, on any path
		if res.Values["fionread"], err = fionreadOf(client); err != nil {
			res.Errors["client"] = err.Error()
		}
		var info *unix.TCPInfo
		if err := control(client, func(fd int) { info, err = unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil {
			return nil, err
		}
		if err != nil {
			return nil, err
		}
		res.Values["syn_data_acked"] = boolValue(info.Options&tcpiOptSynData != 0)
		got, err := readAll(client, seed, 0)
		if err != nil {
			res.Errors["client"] = err.Error()
		}
		res.Received["client"] = Checked{got, seed, c.Bytes}
		return res, nil
	}
}

// tcpiOptSynData is TCPI_OPT_SYN_DATA (linux/tcp.h): the peer acked data
// sent in the SYN.
const tcpiOptSynData = 32

// dialFastOpen connects a non-blocking socket to addr with
// TCP_FASTOPEN_CONNECT, so that its first write, request, goes out in the
// SYN.
func dialFastOpen(addr *net.TCPAddr, request []byte) (*net.TCPConn, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "fast-open")
	defer f.Close()
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_FASTOPEN_CONNECT, 1); err != nil {
		return nil, err
	}
	sa := &unix.SockaddrInet4{Port: addr.Port}
	copy(sa.Addr[:], addr.IP.To4())
	if err := unix.Connect(fd, sa); err != nil && !errors.Is(err, unix.EINPROGRESS) {
		return nil, fmt.Errorf("connect: %w", err)
	}
	conn, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	client := conn.(*net.TCPConn)
	if _, err := client.Write(request); err != nil {
		client.Close()
		return nil, err
	}
	return client, nil
}

// spliceBeforeReply is a client that reads its answer with splice(2), as a
// relay forwarding its upstream's answer does, and begins to splice before
// the server has sent anything: the server waits 200 ms after the
// connection is made, then sends c.Bytes and closes. Values counts the
// reads that fell back to read(2).
func spliceBeforeReply(c Case, client, server *net.TCPConn) (*CaseResult, error) {
	const seed = 62
	res := newResult()
	written := make(chan error, 1)
	go func() {
		time.Sleep(200 * time.Millisecond)
		written <- writeStream(server, c.Bytes, seed, 0)
		server.Close()
	}()
	got, fellBack, err := spliceAll(client, syscallSplice)
	if err != nil {
		res.Errors["client"] = err.Error()
	}
	if err := <-written; err != nil {
		res.Errors["server"] = err.Error()
	}
	res.Received["client"] = Checked{got, seed, c.Bytes}
	res.Values["read fallback"] = int64(fellBack)
	return res, nil
}

// spliceThenFIONREAD: the client begins to splice a second before the
// server's first answer (c.Bytes) and reads it so; after a while, the server
// answers again (1000 bytes), and the client asks FIONREAD before it reads
// that. The daemon, if one runs, has time to act before each answer.
func spliceThenFIONREAD(c Case, client, server *net.TCPConn) (*CaseResult, error) {
	const seed, again = 63, 1000
	res := newResult()
	firstRead := make(chan struct{})
	written := make(chan error, 1)
	go func() {
		time.Sleep(time.Second)
		_, err := io.Copy(server, io.LimitReader(rand.NewChaCha8(seedBytes(seed)), c.Bytes))
		<-firstRead
		if err == nil {
			time.Sleep(time.Second) // for the daemon, if one runs (emulated kernels are slow)
			_, err = server.Write(make([]byte, again))
		}
		written <- err
	}()
	got, fellBack, err := spliceRead(client, syscallSplice, c.Bytes, io.Discard)
	close(firstRead)
	res.Received["client"] = Checked{got, seed, c.Bytes}
	res.Values["read fallback"] = int64(fellBack)
	if err != nil {
		res.Errors["client"] = err.Error()
		return res, nil
	}
	if err := <-written; err != nil {
		res.Errors["server"] = err.Error()
		return res, nil
	}
	if err := waitReadable(client, 5*time.Second); err != nil {
		res.Errors["poll"] = err.Error()
	}
	n, err := fionreadOf(client)
	if err != nil {
		res.Errors["ioctl"] = err.Error()
	}
	res.Values["fionread"] = n
	if _, err := io.ReadFull(client, make([]byte, again)); err != nil {
		res.Errors["read"] = err.Error()
	}
	return res, nil
}

// A splicer moves up to n bytes from c into the pipe end w: 0 is EOF,
// EINVAL says that c can't be spliced.
type splicer func(c *net.TCPConn, w, n int) (int64, error)

// syscallSplice is splice(2), waiting for input as Go's io.Copy does.
func syscallSplice(c *net.TCPConn, w, n int) (int64, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var moved int64
	var serr error
	if err := raw.Read(func(fd uintptr) bool {
		moved, serr = unix.Splice(int(fd), nil, w, nil, n, unix.SPLICE_F_NONBLOCK)
		return !errors.Is(serr, unix.EAGAIN)
	}); err != nil {
		return 0, err
	}
	return moved, serr
}

// spliceAll reads c to EOF with splice through a pipe, or with read(2)
// once splice fails with EINVAL (fellBack 1).
func spliceAll(c *net.TCPConn, splice splicer) (got Received, fellBack int, err error) {
	return spliceRead(c, splice, -1, io.Discard)
}

// spliceRead reads n bytes of c (to EOF if n < 0) as spliceAll does,
// copying them to sink.
func spliceRead(c *net.TCPConn, splice splicer, n int64, sink io.Writer) (got Received, fellBack int, err error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return got, 0, err
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	hash := sha256.New()
	h := io.MultiWriter(hash, sink)
	buf := make([]byte, 64<<10)
	defer func() { got.SHA256 = hex.EncodeToString(hash.Sum(nil)) }()
	want := func() int {
		if n < 0 {
			return len(buf)
		}
		return int(min(int64(len(buf)), n-got.Bytes))
	}
	for want() > 0 {
		moved, serr := splice(c, p[1], want())
		if errors.Is(serr, unix.EINVAL) {
			break
		}
		if serr != nil || moved == 0 {
			return got, 0, serr
		}
		for moved > 0 { // drain what splice put in the pipe
			m, err := unix.Read(p[0], buf[:moved])
			if err != nil {
				return got, 0, err
			}
			h.Write(buf[:m])
			got.Bytes += int64(m)
			moved -= int64(m)
		}
	}
	if want() == 0 {
		return got, 0, nil
	}
	for want() > 0 {
		m, err := c.Read(buf[:want()])
		h.Write(buf[:m])
		got.Bytes += int64(m)
		if errors.Is(err, io.EOF) {
			return got, 1, nil
		}
		if err != nil {
			return got, 1, err
		}
	}
	return got, 1, nil
}

// sendfileSender sends a file with sendfile(2) (Go's ReadFrom from an
// *os.File), as static web servers do.
func sendfileSender(c Case, client, server *net.TCPConn) (*CaseResult, error) {
	res := newResult()
	f, err := os.CreateTemp("", "sockredir-sendfile-")
	if err != nil {
		return nil, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if _, err := io.CopyN(f, rand.NewChaCha8(seedBytes(1)), c.Bytes); err != nil {
		return nil, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	go func() {
		if _, err := client.ReadFrom(f); err != nil {
			res.Errors["sender"] = err.Error()
		}
		client.CloseWrite()
	}()
	got, err := readAll(server, 0, 0)
	if err != nil {
		res.Errors["receiver"] = err.Error()
	}
	res.Received["receiver"] = Checked{got, 1, c.Bytes}
	return res, nil
}

// peek reads each chunk twice: first with MSG_PEEK, then for real.
func peek(c Case, client, server *net.TCPConn) (*CaseResult, error) {
	res := newResult()
	go func() {
		if err := writeStream(client, c.Bytes, 1, 0); err != nil {
			res.Errors["sender"] = err.Error()
		}
	}()
	raw, err := server.SyscallConn()
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	var n, mismatches int64
	peeked, buf := make([]byte, 4096), make([]byte, 4096)
	for {
		var k int
		var rerr error
		raw.Read(func(fd uintptr) bool {
			k, _, rerr = unix.Recvfrom(int(fd), peeked, unix.MSG_PEEK)
			return rerr != unix.EAGAIN
		})
		if rerr != nil || k == 0 {
			if rerr != nil {
				res.Errors["peek"] = rerr.Error()
			}
			break
		}
		got, err := io.ReadFull(server, buf[:k])
		if err != nil {
			res.Errors["read"] = err.Error()
			break
		}
		if string(buf[:got]) != string(peeked[:k]) {
			mismatches++
		}
		h.Write(buf[:got])
		n += int64(got)
	}
	res.Values["peek_mismatches"] = mismatches
	res.Received["receiver"] = Checked{Received{hex.EncodeToString(h.Sum(nil)), n}, 1, c.Bytes}
	return res, nil
}

// fionread sends a few bytes and asks the receiver how many are waiting, as
// nginx does before it reads; then does the same on a second connection to
// the same server port.
func fionread(c Case) (*CaseResult, error) {
	res := newResult()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	for _, name := range []string{"fionread", "fionread_next_connection"} {
		client, server, err := connect(ln)
		if err != nil {
			return nil, err
		}
		n, err := fionreadOnce(c.Bytes, client, server)
		client.Close()
		server.Close()
		if err != nil {
			res.Errors[name] = err.Error()
		}
		res.Values[name] = n
	}
	return res, nil
}

func fionreadOnce(bytes int64, client, server *net.TCPConn) (int64, error) {
	if _, err := client.Write(make([]byte, bytes)); err != nil {
		return 0, err
	}
	if err := waitReadable(server, 2*time.Second); err != nil {
		return 0, err
	}
	time.Sleep(50 * time.Millisecond) // all of it arrived, on any path
	return fionreadOf(server)
}

// fionreadOf asks how many bytes are waiting at c.
func fionreadOf(c *net.TCPConn) (int64, error) {
	var n int
	var ierr error
	if err := control(c, func(fd int) { n, ierr = unix.IoctlGetInt(fd, unix.SIOCINQ) }); err != nil {
		return 0, err
	}
	return int64(n), ierr
}

// When the receiver of the rcvlowat cases sets SO_RCVLOWAT.
const (
	afterAccept   = iota // the server, on its accepted socket, before any data
	beforeConnect        // the client, before it connects
	afterData            // the server, after it has read some of the stream
)

// rcvlowat sets SO_RCVLOWAT (c.Bytes) on the receiver: it must not be
// reported readable before that many bytes have arrived.
func rcvlowat(when int) func(Case) (*CaseResult, error) {
	return func(c Case) (*CaseResult, error) {
		res := newResult()
		ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return nil, err
		}
		defer ln.Close()
		var lowatErr error
		setLowat := func(fd int) { lowatErr = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, int(c.Bytes)) }
		dialer := net.Dialer{}
		if when == beforeConnect {
			dialer.Control = func(_, _ string, raw syscall.RawConn) error {
				return errors.Join(raw.Control(func(fd uintptr) { setLowat(int(fd)) }), lowatErr)
			}
		}
		conn, err := dialer.Dial("tcp", ln.Addr().String())
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		accepted, err := ln.AcceptTCP()
		if err != nil {
			return nil, err
		}
		defer accepted.Close()
		sender, receiver := conn.(*net.TCPConn), accepted
		if when == beforeConnect {
			sender, receiver = receiver, sender
		}
		if when == afterData {
			// A first part that the receiver reads entirely.
			if _, err := sender.Write(make([]byte, 100)); err != nil {
				return nil, err
			}
			if _, err := io.ReadFull(receiver, make([]byte, 100)); err != nil {
				return nil, err
			}
		}
		if when != beforeConnect {
			if err := control(receiver, setLowat); err != nil || lowatErr != nil {
				return nil, errors.Join(err, lowatErr)
			}
		}
		if _, err := sender.Write(make([]byte, c.Bytes/2)); err != nil {
			return nil, err
		}
		res.Values["readable_below_lowat"] = boolValue(waitReadable(receiver, 200*time.Millisecond) == nil)
		if _, err := sender.Write(make([]byte, c.Bytes-c.Bytes/2)); err != nil {
			return nil, err
		}
		res.Values["readable_at_lowat"] = boolValue(waitReadable(receiver, 2*time.Second) == nil)
		return res, nil
	}
}

// epollLevelRDHUP reads the way C event loops do: a level-triggered epoll
// asking for EPOLLIN and EPOLLRDHUP, and one small read per wakeup, while
// the sender streams and then shuts down its side. Every byte must arrive,
// no read after a wakeup may fail with EAGAIN, and EPOLLRDHUP must come with
// the end of the stream.
func epollLevelRDHUP(c Case, client, server *net.TCPConn) (*CaseResult, error) {
	res := newResult()
	go func() {
		if err := writeStream(client, c.Bytes, 1, 0); err != nil {
			res.Errors["sender"] = err.Error()
		}
		client.CloseWrite()
	}()
	h := sha256.New()
	var n, spurious, rdhup int64
	var loopErr error
	err := control(server, func(fd int) {
		ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			loopErr = err
			return
		}
		defer unix.Close(ep)
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP, Fd: int32(fd)}
		if loopErr = unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &ev); loopErr != nil {
			return
		}
		buf := make([]byte, 4096)
		events := make([]unix.EpollEvent, 1)
		for {
			k, err := unix.EpollWait(ep, events, 5000)
			switch {
			case errors.Is(err, unix.EINTR):
				continue
			case err != nil:
				loopErr = err
				return
			case k == 0:
				loopErr = fmt.Errorf("no epoll event for 5 s after %d bytes", n)
				return
			}
			if events[0].Events&unix.EPOLLRDHUP != 0 {
				rdhup = 1
			}
			m, err := unix.Read(fd, buf)
			switch {
			case errors.Is(err, unix.EAGAIN):
				spurious++
			case err != nil:
				loopErr = err
				return
			case m == 0:
				return
			default:
				h.Write(buf[:m])
				n += int64(m)
			}
		}
	})
	if err = errors.Join(err, loopErr); err != nil {
		res.Errors["receiver"] = err.Error()
	}
	res.Received["receiver"] = Checked{Received{hex.EncodeToString(h.Sum(nil)), n}, 1, c.Bytes}
	res.Values["eagain_after_epollin"] = spurious
	res.Values["rdhup"] = rdhup
	return res, nil
}

// rcvlowatThenFIONREAD puts a connection back on TCP halfway (the receiver
// sets SO_RCVLOWAT), lets a while pass, then asks FIONREAD for bytes that
// came over TCP, and reads everything.
func rcvlowatThenFIONREAD(c Case, client, server *net.TCPConn) (*CaseResult, error) {
	res := newResult()
	if _, err := client.Write(make([]byte, 100)); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(server, make([]byte, 100)); err != nil {
		return nil, err
	}
	if err := setRcvlowat(server, int(c.Bytes)); err != nil {
		return nil, err
	}
	if _, err := client.Write(make([]byte, c.Bytes)); err != nil {
		return nil, err
	}
	time.Sleep(time.Second) // for the daemon, if one runs (emulated kernels are slow)
	n, err := fionreadOf(server)
	if err != nil {
		res.Errors["ioctl"] = err.Error()
	}
	res.Values["fionread"] = n
	if _, err := io.ReadFull(server, make([]byte, c.Bytes)); err != nil {
		res.Errors["read"] = err.Error()
	}
	return res, nil
}

// rcvlowatThenSplice: the server sets SO_RCVLOWAT while the client's first
// c.Bytes wait for it (an accelerated connection goes back to TCP), the
// client sends c.Bytes more and stays connected for two seconds, and the
// server reads to the end with splice (read(2) once splice fails with
// EINVAL).
func rcvlowatThenSplice(c Case, client, server *net.TCPConn) (*CaseResult, error) {
	const seed = 64
	res := newResult()
	stream := rand.NewChaCha8(seedBytes(seed))
	if _, err := io.CopyN(client, stream, c.Bytes); err != nil {
		return nil, err
	}
	if err := waitReadable(server, 5*time.Second); err != nil {
		return nil, err
	}
	if err := setRcvlowat(server, 2); err != nil {
		return nil, err
	}
	written := make(chan error, 1)
	go func() {
		_, err := io.CopyN(client, stream, c.Bytes)
		time.Sleep(2 * time.Second) // longer than the upkeep leaves a splice reader's queue unread
		written <- errors.Join(err, client.CloseWrite())
	}()
	got, fellBack, err := spliceRead(server, syscallSplice, -1, io.Discard)
	res.Received["server"] = Checked{got, seed, 2 * c.Bytes}
	res.Values["read fallback"] = int64(fellBack)
	if err != nil {
		res.Errors["server"] = err.Error()
	}
	if err := <-written; err != nil {
		res.Errors["client"] = err.Error()
	}
	return res, nil
}

// refusalToSpliceReader: the client's first c.Bytes wait for the server,
// which then begins to splice; the client sets SO_RCVLOWAT (its own reads
// would go back to TCP), sends c.Bytes more and stays connected for two
// seconds. Values as for toSpliceReader.
func refusalToSpliceReader(c Case, client, server *net.TCPConn) (*CaseResult, error) {
	sent := make([]byte, 2*c.Bytes)
	rand.NewChaCha8(seedBytes(65)).Read(sent)
	return toSpliceReader(sent[:c.Bytes], sent, client, server, func() error {
		time.Sleep(200 * time.Millisecond) // the server splices
		if err := setRcvlowat(client, 2); err != nil {
			return err
		}
		_, err := client.Write(sent[c.Bytes:])
		time.Sleep(2 * time.Second) // longer than the upkeep leaves a splice reader's queue unread
		return err
	})
}

// spliceReaderDuringDown: the server begins to splice(2) once c.Bytes have
// been sent to it, while the client goes on sending 32 more pieces of
// c.Bytes/8, one every 100 ms, for a test that runs `down` meanwhile. Values
// as for toSpliceReader.
func spliceReaderDuringDown(c Case, client, server *net.TCPConn) (*CaseResult, error) {
	const pieces = 32
	sent := make([]byte, c.Bytes+pieces*(c.Bytes/8))
	rand.NewChaCha8(seedBytes(66)).Read(sent)
	return toSpliceReader(sent[:c.Bytes], sent, client, server, func() error {
		var err error
		for rest := sent[c.Bytes:]; len(rest) > 0 && err == nil; rest = rest[c.Bytes/8:] {
			time.Sleep(100 * time.Millisecond)
			_, err = client.Write(rest[:c.Bytes/8])
		}
		return err
	})
}

// toSpliceReader sends first, lets the server begin to splice(2) once it is
// readable, has the client send the rest of sent (then), and half-closes.
// Values: received, "read fallback", and prefix_matches 1 if what the
// server read, however it ended, is the start of sent: a hole never is.
func toSpliceReader(first, sent []byte, client, server *net.TCPConn, then func() error) (*CaseResult, error) {
	res := newResult()
	if _, err := client.Write(first); err != nil {
		return nil, err
	}
	if err := waitReadable(server, 5*time.Second); err != nil {
		return nil, err
	}
	var read bytes.Buffer
	readErr := make(chan error, 1)
	go func() {
		_, fellBack, err := spliceRead(server, syscallSplice, -1, &read)
		res.Values["read fallback"] = int64(fellBack)
		readErr <- err
	}()
	if err := errors.Join(then(), client.CloseWrite()); err != nil {
		res.Errors["client"] = err.Error()
	}
	select {
	case err := <-readErr:
		if err != nil {
			res.Errors["server"] = err.Error()
		}
	case <-time.After(10 * time.Second):
		return nil, errors.New("the splice reader still waits, 10 s after its peer's end")
	}
	res.Values["received"] = int64(read.Len())
	res.Values["prefix_matches"] = boolValue(bytes.HasPrefix(sent, read.Bytes()))
	return res, nil
}

// replyThenFIONREAD: the client sends a request, the server answers with
// c.Bytes, and after a while the client asks FIONREAD, then reads the answer.
func replyThenFIONREAD(c Case, client, server *net.TCPConn) (*CaseResult, error) {
	res := newResult()
	if _, err := client.Write(make([]byte, 100)); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(server, make([]byte, 100)); err != nil {
		return nil, err
	}
	if _, err := server.Write(make([]byte, c.Bytes)); err != nil {
		return nil, err
	}
	time.Sleep(time.Second) // for the daemon, if one runs (emulated kernels are slow)
	n, err := fionreadOf(client)
	if err != nil {
		res.Errors["ioctl"] = err.Error()
	}
	res.Values["fionread"] = n
	if _, err := io.ReadFull(client, make([]byte, c.Bytes)); err != nil {
		res.Errors["read"] = err.Error()
	}
	return res, nil
}

// abortiveClose sends, then closes with SO_LINGER 0 (an RST) once the
// receiver has bytes queued. The receiver must read a prefix of what was
// sent, not an empty one (the queued bytes stay readable), and then an
// ordinary end: EOF or ECONNRESET, nothing else.
func abortiveClose(c Case, client, server *net.TCPConn) (*CaseResult, error) {
	res := newResult()
	if _, err := io.Copy(client, io.LimitReader(rand.NewChaCha8(seedBytes(1)), c.Bytes)); err != nil {
		return nil, err
	}
	if err := waitReadable(server, 2*time.Second); err != nil {
		return nil, err
	}
	client.SetLinger(0)
	client.Close()
	h := sha256.New()
	var n int64
	buf := make([]byte, 64<<10)
	for {
		k, err := server.Read(buf)
		h.Write(buf[:k])
		n += int64(k)
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, unix.ECONNRESET) {
				res.Errors["receiver"] = err.Error()
			}
			break
		}
	}
	prefix := sha256.New()
	io.CopyN(prefix, rand.NewChaCha8(seedBytes(1)), n)
	res.Values["received"] = n
	res.Values["prefix_matches"] = boolValue(string(prefix.Sum(nil)) == string(h.Sum(nil)))
	return res, nil
}

// waitReadable polls c for input without reading it.
func waitReadable(c *net.TCPConn, timeout time.Duration) error {
	var n int
	var perr error
	err := control(c, func(fd int) {
		n, perr = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, int(timeout.Milliseconds()))
	})
	if err = errors.Join(err, perr); err == nil && n == 0 {
		err = errors.New("not readable")
	}
	return err
}

// setRcvlowat sets SO_RCVLOWAT on c.
func setRcvlowat(c *net.TCPConn, n int) error {
	var err error
	if cerr := control(c, func(fd int) { err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, n) }); cerr != nil {
		return cerr
	}
	return err
}

// control runs fn on the file descriptor of a connection or listener.
func control(c syscall.Conn, fn func(fd int)) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	return raw.Control(func(fd uintptr) { fn(int(fd)) })
}

func boolValue(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

// connectTime connects to Target and reports how long connect(2) took to
// succeed or give up, in milliseconds.
func connectTime(c Case) (*CaseResult, error) {
	res := newResult()
	start := time.Now()
	conn, err := net.DialTimeout("tcp", c.Target, time.Minute)
	res.Values["connect_ms"] = time.Since(start).Milliseconds()
	if err != nil {
		res.Errors["connect"] = err.Error()
	} else {
		conn.Close()
	}
	return res, nil
}

// tcpTuning connects to c.Target (listening there itself) and reports what
// each end's socket says about its tuning: the TCP options negotiated, the
// buffer sizes, the congestion window and the congestion control.
func tcpTuning(c Case) (*CaseResult, error) {
	res := newResult()
	ln, err := net.Listen("tcp", c.Target)
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	client, err := net.Dial("tcp", c.Target)
	if err != nil {
		return nil, err
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		return nil, err
	}
	defer server.Close()
	for side, conn := range map[string]net.Conn{"client": client, "server": server} {
		var info *unix.TCPInfo
		var rcvbuf, sndbuf int
		var congestion string
		var errs [4]error
		if err := control(conn.(*net.TCPConn), func(fd int) {
			info, errs[0] = unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
			rcvbuf, errs[1] = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF)
			sndbuf, errs[2] = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF)
			congestion, errs[3] = unix.GetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION)
		}); err != nil {
			return nil, err
		}
		if err := errors.Join(errs[:]...); err != nil {
			return nil, err
		}
		res.Values[side+"_options"] = int64(info.Options)
		res.Values[side+"_snd_cwnd"] = int64(info.Snd_cwnd)
		res.Values[side+"_rcvbuf"] = int64(rcvbuf)
		res.Values[side+"_sndbuf"] = int64(sndbuf)
		res.Texts[side+"_congestion"] = congestion
	}
	return res, nil
}

// reconnect uses one client socket for two connections, as connect(2) with
// AF_UNSPEC allows: the first server's answer is left unread when the
// client disconnects, which discards it. The client then connects to a
// second server (listening on c.Target if set, so that a policy can name
// it), sends it c.Bytes and half-closes; the second server answers with 4
// KiB and closes. Values["first_server_extra"] counts bytes sent after the
// disconnect that reached the first server; Texts["write while
// unconnected"] is the error of a write between the connections.
func reconnect(c Case) (*CaseResult, error) {
	res := newResult()
	firstLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	defer firstLn.Close()
	secondAddr := "127.0.0.1:0"
	if c.Target != "" {
		secondAddr = c.Target
	}
	secondLn, err := net.Listen("tcp", secondAddr)
	if err != nil {
		return nil, err
	}
	defer secondLn.Close()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)

	first, err := connectNonblocking(fd, firstLn)
	if err != nil {
		return nil, err
	}
	defer first.Close()
	const request = "first request"
	if _, err := unix.Write(fd, []byte(request)); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(first, make([]byte, len(request))); err != nil {
		return nil, err
	}
	if _, err := io.CopyN(first, rand.NewChaCha8(seedBytes(3)), 4<<10); err != nil {
		return nil, err
	}
	if n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 2000); err != nil || n == 0 {
		return nil, fmt.Errorf("the first answer never became readable: %v", err)
	}
	if err := disconnect(fd); err != nil {
		return nil, fmt.Errorf("connect(AF_UNSPEC): %w", err)
	}
	// Unconnected, a socket can't send (EPIPE), once the reset of the
	// disconnect has been collected.
	unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if _, err := unix.Write(fd, []byte("stray")); err != nil {
		res.Texts["write while unconnected"] = err.Error()
	}

	second, err := connectNonblocking(fd, secondLn)
	if err != nil {
		return nil, err
	}
	defer second.Close()
	serverDone := make(chan error, 1)
	go func() {
		got, err := readAll(second, 0, 0)
		res.Received["second server"] = Checked{got, 1, c.Bytes}
		if err == nil {
			_, err = io.CopyN(second, rand.NewChaCha8(seedBytes(2)), 4<<10)
		}
		second.Close()
		serverDone <- err
	}()
	if _, err := io.Copy(fdWriter(fd), io.LimitReader(rand.NewChaCha8(seedBytes(1)), c.Bytes)); err != nil {
		res.Errors["client"] = err.Error()
	}
	unix.Shutdown(fd, unix.SHUT_WR)
	if err := <-serverDone; err != nil {
		res.Errors["second server"] = err.Error()
	}
	got, err := readAllFrom(fdReader(fd))
	if err != nil {
		res.Errors["client"] = err.Error()
	}
	res.Received["client"] = Checked{got, 2, 4 << 10}

	first.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	extra, _ := io.Copy(io.Discard, first)
	res.Values["first_server_extra"] = extra
	return res, nil
}

// connectNonblocking connects fd to ln as Go's own sockets connect (a
// blocking socket would be left on TCP), returns the accepted end, and
// leaves fd blocking for the caller's reads and writes.
func connectNonblocking(fd int, ln net.Listener) (*net.TCPConn, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	err := unix.Connect(fd, &unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}})
	if errors.Is(err, unix.EINPROGRESS) {
		if _, err = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}, 5000); err == nil {
			var soErr int
			if soErr, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); err == nil && soErr != 0 {
				err = unix.Errno(soErr)
			}
		}
	}
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", ln.Addr(), err)
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		return nil, err
	}
	s, err := ln.Accept()
	if err != nil {
		return nil, err
	}
	return s.(*net.TCPConn), nil
}

// disconnect dissolves fd's connection, as connect(2) to an AF_UNSPEC
// address does; the socket can connect again afterwards.
func disconnect(fd int) error {
	sa := unix.RawSockaddr{Family: unix.AF_UNSPEC}
	_, _, errno := unix.Syscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa))
	if errno != 0 {
		return errno
	}
	return nil
}

// readAllFrom reads r to its EOF and says what it read.
func readAllFrom(r io.Reader) (Received, error) {
	h := sha256.New()
	n, err := io.Copy(h, r)
	return Received{SHA256: hex.EncodeToString(h.Sum(nil)), Bytes: n}, err
}

// urgentData: the client sends "ab" then "c" with MSG_OOB (c is the urgent
// byte), then "de"; the server reads its stream to EOF, and the urgent byte
// with MSG_OOB. Texts: "stream", "urgent".
func urgentData(c Case, client, server *net.TCPConn) (*CaseResult, error) {
	res := newResult()
	var sendErr error
	if err := control(client, func(fd int) {
		if _, sendErr = unix.Write(fd, []byte("ab")); sendErr == nil {
			if sendErr = unix.Sendmsg(fd, []byte("c"), nil, nil, unix.MSG_OOB); sendErr == nil {
				_, sendErr = unix.Write(fd, []byte("de"))
			}
		}
	}); err != nil || sendErr != nil {
		return nil, errors.Join(err, sendErr)
	}
	time.Sleep(100 * time.Millisecond)
	var urgent [1]byte
	var n int
	var oobErr error
	control(server, func(fd int) { n, _, _, _, oobErr = unix.Recvmsg(fd, urgent[:], nil, unix.MSG_OOB) })
	if oobErr != nil {
		res.Errors["urgent"] = oobErr.Error()
	}
	res.Texts["urgent"] = string(urgent[:n])
	client.CloseWrite()
	stream, err := io.ReadAll(server)
	if err != nil {
		res.Errors["server"] = err.Error()
	}
	res.Texts["stream"] = string(stream)
	return res, nil
}
