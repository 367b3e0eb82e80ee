package harness

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Transfer runs connections that each stream pseudo-random bytes both ways at
// once, in writes and reads of varying sizes, and half-close each direction
// when done. Connection i's client sends the stream of seed Seed+2i, its
// server that of Seed+2i+1, so a receiver's checksum can be checked against
// StreamSHA256 without trusting the sender's report.
type Transfer struct {
	// Listen is the server's address, e.g. "127.0.0.1:0". Empty means
	// only the client side runs, against Dial (host:port), served by Serve.
	Listen string `json:"listen,omitempty"`
	// Dial is the host the client dials (the listener's port is added, or
	// DialPort); empty means the listener's own address.
	Dial        string `json:"dial,omitempty"`
	DialPort    int    `json:"dial_port,omitempty"` // a relay in front of the listener
	Bytes       int64  `json:"bytes"`               // per direction and connection
	Seed        uint64 `json:"seed"`
	Connections int    `json:"connections,omitempty"` // 0 means 1
	// OneWay: only the client sends (the server's stream is empty).
	OneWay bool `json:"one_way,omitempty"`
	// ClientPort binds the client to this local port (with Connections 1).
	ClientPort int `json:"client_port,omitempty"`
	// ServerReadDelay holds the server's first read back this long: a
	// reader that doesn't keep up.
	ServerReadDelay time.Duration `json:"server_read_delay,omitempty"`
	// ReadPause is slept before every read: a slow reader.
	ReadPause time.Duration `json:"read_pause,omitempty"`
	// HoldOpen delays each side's half-close, keeping the connection
	// established (a redirecting writer finishes at once).
	HoldOpen time.Duration `json:"hold_open,omitempty"`
	// EagerClient starts each client as soon as it is connected, as real
	// clients do, possibly before the server's side of the handshake has
	// finished; sockredir then declines the pair, which stays on TCP.
	// Otherwise a client starts once the server has accepted, so that a
	// test of something else always gets an accelerated connection.
	EagerClient bool `json:"eager_client,omitempty"`
	// CheckFIONREAD: each side, once its first bytes are readable, asks
	// FIONREAD, which must count them (only on kernels whose tcp_bpf
	// counts redirected bytes: elsewhere asking refuses acceleration).
	CheckFIONREAD bool `json:"check_fionread,omitempty"`
	// ServerAnswersEOF: the server reads until the client's EOF before it
	// writes and half-closes, as a server of requests does (a health
	// check, whose client sends nothing, then sees the server close last).
	ServerAnswersEOF bool `json:"server_answers_eof,omitempty"`
}

// Received is what one side of a connection read.
type Received struct {
	SHA256 string `json:"sha256"`
	Bytes  int64  `json:"bytes"`
}

// TransferResult is what a Transfer agent reports.
type TransferResult struct {
	Client []Received `json:"client"` // what connection i's client read
	Server []Received `json:"server"` // what connection i's server read, if it ran here
	// TCPOutSegs is how many TCP segments the namespace sent meanwhile: a
	// redirected transfer sends little more than its handshakes.
	TCPOutSegs uint64 `json:"tcp_out_segs"`
}

// Run runs the transfer in this process.
func (t *Transfer) Run() (*TransferResult, error) {
	conns := max(t.Connections, 1)
	res := &TransferResult{Client: make([]Received, conns)}
	dial := t.Dial
	var ln net.Listener
	if t.Listen != "" {
		var err error
		if ln, err = net.Listen("tcp", t.Listen); err != nil {
			return nil, err
		}
		defer ln.Close()
		port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
		if t.DialPort != 0 {
			port = strconv.Itoa(t.DialPort)
		}
		if dial == "" {
			dial = ln.Addr().String()
		} else {
			dial = net.JoinHostPort(dial, port)
		}
		res.Server = make([]Received, conns)
	}
	segsBefore, err := TCPOutSegs()
	if err != nil {
		return nil, err
	}

	var wg sync.WaitGroup
	errs := make([]error, 2*conns)
	dialer := net.Dialer{}
	if t.ClientPort != 0 {
		dialer.LocalAddr = &net.TCPAddr{Port: t.ClientPort}
	}
	for i := range conns {
		// Dialing and accepting in step keeps connection i's two ends
		// together: the accept queue is in order.
		client, err := dialer.Dial("tcp", dial)
		if err != nil {
			return nil, err
		}
		defer client.Close()
		startClient := func() {
			wg.Go(func() {
				res.Client[i], errs[2*i] = t.exchange(client.(*net.TCPConn), t.Bytes, t.Seed+2*uint64(i), 0)
			})
		}
		if ln == nil || t.EagerClient {
			startClient()
		}
		if ln == nil {
			continue
		}
		server, err := ln.Accept()
		if err != nil {
			return nil, err
		}
		defer server.Close()
		if !t.EagerClient {
			startClient()
		}
		wg.Go(func() {
			res.Server[i], errs[2*i+1] = t.serverExchange(server.(*net.TCPConn), t.Seed+2*uint64(i)+1)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	segsAfter, err := TCPOutSegs()
	if err != nil {
		return nil, err
	}
	res.TCPOutSegs = segsAfter - segsBefore
	return res, nil
}

// Serve is the server side of a Transfer whose client runs elsewhere: it
// accepts one connection and exchanges the stream of seed Seed+1.
func (t *Transfer) Serve(ln net.Listener) (Received, error) {
	c, err := ln.Accept()
	if err != nil {
		return Received{}, err
	}
	defer c.Close()
	return t.serverExchange(c.(*net.TCPConn), t.Seed+1)
}

func (t *Transfer) serverBytes() int64 {
	if t.OneWay {
		return 0
	}
	return t.Bytes
}

// serverExchange is the server's side of the exchange on c.
func (t *Transfer) serverExchange(c *net.TCPConn, seed uint64) (Received, error) {
	if !t.ServerAnswersEOF {
		return t.exchange(c, t.serverBytes(), seed, t.ServerReadDelay)
	}
	got, err := readAll(c, seed, t.ReadPause)
	if err != nil {
		return got, err
	}
	return got, writeStream(c, t.serverBytes(), seed, t.HoldOpen)
}

func (t *Transfer) exchange(c *net.TCPConn, n int64, seed uint64, readDelay time.Duration) (Received, error) {
	writeErr := make(chan error, 1)
	go func() { writeErr <- writeStream(c, n, seed, t.HoldOpen) }()
	time.Sleep(readDelay)
	if t.CheckFIONREAD {
		if err := fionreadCountsFirstBytes(c); err != nil {
			return Received{}, errors.Join(err, <-writeErr)
		}
	}
	got, err := readAll(c, seed, t.ReadPause)
	return got, errors.Join(err, <-writeErr)
}

// Exchange writes the stream of (n, seed) to c and half-closes it, while it
// reads c until EOF; it returns what it read.
func Exchange(c *net.TCPConn, n int64, seed uint64) (Received, error) {
	return (&Transfer{}).exchange(c, n, seed, 0)
}

// StreamSHA256 is the checksum of the n bytes that a sender with seed writes.
func StreamSHA256(n int64, seed uint64) string {
	h := sha256.New()
	stream := rand.NewChaCha8(seedBytes(seed))
	io.CopyN(h, stream, n)
	return hex.EncodeToString(h.Sum(nil))
}

// writeStream writes the stream in writes of 1 B to 256 KiB, then waits
// holdOpen and half-closes.
func writeStream(c *net.TCPConn, n int64, seed uint64, holdOpen time.Duration) error {
	stream := rand.NewChaCha8(seedBytes(seed))
	sizes := rand.New(rand.NewPCG(seed, 1))
	buf := make([]byte, 256<<10)
	for n > 0 {
		chunk := buf[:min(int64(1+sizes.IntN(len(buf))), n)]
		stream.Read(chunk)
		if _, err := c.Write(chunk); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		n -= int64(len(chunk))
	}
	time.Sleep(holdOpen)
	return c.CloseWrite()
}

// readAll reads until EOF in reads of varying sizes, pausing before each.
func readAll(c *net.TCPConn, seed uint64, pause time.Duration) (Received, error) {
	sizes := rand.New(rand.NewPCG(seed, 2))
	h := sha256.New()
	buf := make([]byte, 256<<10)
	var total int64
	for {
		time.Sleep(pause)
		n, err := c.Read(buf[:1+sizes.IntN(len(buf))])
		h.Write(buf[:n])
		total += int64(n)
		if errors.Is(err, io.EOF) {
			return Received{SHA256: hex.EncodeToString(h.Sum(nil)), Bytes: total}, nil
		}
		if err != nil {
			return Received{}, fmt.Errorf("read after %d bytes: %w", total, err)
		}
	}
}

// fionreadCountsFirstBytes waits until c has bytes to read (or its EOF) and
// fails unless FIONREAD then counts them, as it does without acceleration.
func fionreadCountsFirstBytes(c *net.TCPConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var checkErr error
	err = raw.Read(func(fd uintptr) bool {
		var b [1]byte
		// Peek first: bytes seen can't go away before FIONREAD.
		n, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		if errors.Is(err, unix.EAGAIN) {
			return false
		}
		if err != nil || n == 0 {
			checkErr = err
			return true
		}
		queued, err := unix.IoctlGetInt(int(fd), unix.SIOCINQ)
		if err == nil && queued < 1 {
			err = fmt.Errorf("FIONREAD says %d with bytes readable", queued)
		}
		checkErr = err
		return true
	})
	return errors.Join(err, checkErr)
}

func seedBytes(seed uint64) [32]byte {
	var b [32]byte
	for i := range 8 {
		b[i] = byte(seed >> (8 * i))
	}
	return b
}

// TCPOutSegs returns the Tcp OutSegs counter of this process's network
// namespace, as nstat shows it.
func TCPOutSegs() (uint64, error) {
	f, err := os.Open("/proc/self/net/snmp")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	var header []string
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) == 0 || fields[0] != "Tcp:" {
			continue
		}
		if header == nil {
			header = fields
			continue
		}
		for i, name := range header {
			if name == "OutSegs" && i < len(fields) {
				return strconv.ParseUint(fields[i], 10, 64)
			}
		}
	}
	return 0, errors.New("no Tcp OutSegs in /proc/self/net/snmp")
}

// Check fails tb unless every receiver got exactly the stream its peer sent.
func (t *Transfer) Check(tb testing.TB, res *TransferResult) {
	tb.Helper()
	// Both ends of every connection: a server that ran elsewhere (Dial)
	// is the caller's to add.
	if conns := max(t.Connections, 1); len(res.Client) != conns || len(res.Server) != conns {
		tb.Errorf("results of %d clients and %d servers, want %d of each", len(res.Client), len(res.Server), conns)
	}
	for i, got := range res.Client {
		n := t.serverBytes()
		if want := StreamSHA256(n, t.Seed+2*uint64(i)+1); got.SHA256 != want || got.Bytes != n {
			tb.Errorf("connection %d: the client read %d bytes (sha256 %.12s), want %d (sha256 %.12s)",
				i, got.Bytes, got.SHA256, n, want)
		}
	}
	for i, got := range res.Server {
		if want := StreamSHA256(t.Bytes, t.Seed+2*uint64(i)); got.SHA256 != want || got.Bytes != t.Bytes {
			tb.Errorf("connection %d: the server read %d bytes (sha256 %.12s), want %d (sha256 %.12s)",
				i, got.Bytes, got.SHA256, t.Bytes, want)
		}
	}
}
