package test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/sandbox"
	"github.com/sockredir/sockredir/pkg/trace"
	"github.com/sockredir/sockredir/test/harness"
)

// traceSession is pkg/trace running in this process, collecting events.
type traceSession struct {
	t      *testing.T
	mu     sync.Mutex
	events []trace.Event
	done   chan struct{}
	stop   func()
}

// startTraceSession attaches a tracer and reads its events until the test
// ends or stop is called.
func startTraceSession(t *testing.T, opts trace.Options) *traceSession {
	t.Helper()
	tracer, err := trace.Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	s := &traceSession{t: t, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for {
			ev, err := tracer.Read()
			if err != nil {
				if !errors.Is(err, trace.ErrClosed) {
					t.Errorf("reading trace events: %v", err)
				}
				return
			}
			s.mu.Lock()
			s.events = append(s.events, ev)
			s.mu.Unlock()
		}
	}()
	s.stop = sync.OnceFunc(func() {
		if err := tracer.Close(); err != nil {
			t.Errorf("closing the tracer: %v", err)
		}
		<-s.done
	})
	t.Cleanup(s.stop)
	return s
}

func (s *traceSession) snapshot() []trace.Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.events)
}

// waitFor returns the events once cond holds for them, failing the test
// after timeout.
func (s *traceSession) waitFor(what string, timeout time.Duration, cond func([]trace.Event) bool) []trace.Event {
	s.t.Helper()
	for deadline := time.Now().Add(timeout); ; time.Sleep(20 * time.Millisecond) {
		events := s.snapshot()
		if cond(events) {
			return events
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("no %s within %v; events:\n%s", what, timeout, traceLines(events))
		}
	}
}

func traceLines(events []trace.Event) string {
	var b strings.Builder
	for _, ev := range events {
		b.WriteString(ev.String() + "\n")
	}
	return b.String()
}

// bySocket groups events by socket, in order.
func bySocket(events []trace.Event) map[uint64][]trace.Event {
	sockets := make(map[uint64][]trace.Event)
	for _, ev := range events {
		sockets[ev.Socket] = append(sockets[ev.Socket], ev)
	}
	return sockets
}

func hasOp(events []trace.Event, op trace.Op) bool {
	return slices.ContainsFunc(events, func(ev trace.Event) bool { return ev.Op == op })
}

// closedSockets counts the sockets whose STATE_CB reached CLOSE.
func closedSockets(events []trace.Event) int {
	n := 0
	for _, ev := range events {
		if ev.Op == trace.OpStateChange && ev.NewState == trace.StateClose {
			n++
		}
	}
	return n
}

// checkStateChain checks that a socket's STATE_CB events form one chain
// from first to CLOSE, each leaving the state the one before entered.
func checkStateChain(t *testing.T, who string, events []trace.Event, first trace.State) {
	t.Helper()
	want := first
	var chain []string
	for _, ev := range events {
		if ev.Op != trace.OpStateChange {
			continue
		}
		chain = append(chain, ev.OldState.String()+">"+ev.NewState.String())
		if ev.OldState != want {
			t.Errorf("%s: state chain %v breaks: want a change from %s", who, chain, want)
			return
		}
		want = ev.NewState
	}
	if want != trace.StateClose || len(chain) < 2 {
		t.Errorf("%s: state chain %v, want it to go from %s to CLOSE", who, chain, first)
	}
}

// netnsCookie is the cookie of the test's network namespace.
func netnsCookie(t *testing.T, e *harness.Env) uint64 {
	var cookie uint64
	e.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		return err
	})
	return cookie
}

// One redirected connection, traced from listen to close, while the
// datapath keeps redirecting every byte.
func TestTraceConnection(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	s := startTraceSession(t, trace.Options{PinDir: e.PinDir})
	if ids := e.AttachedSockOps(); len(ids) != 2 {
		t.Fatalf("sock_ops programs on the cgroup while tracing: %v, want the datapath's and trace's", ids)
	}

	const port = 7411
	tr := harness.Transfer{Listen: "127.0.0.1:7411", Bytes: 4 << 20, Seed: 11}
	var res harness.TransferResult
	e.Run(harness.Scenario{Transfer: &tr}, &res)
	tr.Check(t, &res)
	c := e.Status().Counters
	if c.SocketsAdded != 2 || c.BytesRedirected != uint64(2*tr.Bytes) || c.BytesPassed != 0 {
		t.Errorf("while tracing, want 2 sockets added and all %d bytes redirected, got %+v", 2*tr.Bytes, c)
	}
	if res.TCPOutSegs > handshakeSegments {
		t.Errorf("while tracing, the namespace sent %d TCP segments: data took the TCP path", res.TCPOutSegs)
	}

	events := s.waitFor("CLOSE of both sockets", 5*time.Second, func(evs []trace.Event) bool { return closedSockets(evs) == 2 })
	s.stop()
	if ids := e.AttachedSockOps(); len(ids) != 1 {
		t.Errorf("sock_ops programs on the cgroup after tracing: %v, want the datapath's alone", ids)
	}
	t.Logf("events:\n%s", traceLines(events))

	ns := netnsCookie(t, e)
	var listener, client, server []trace.Event
	for _, evs := range bySocket(events) {
		switch first := evs[0]; {
		case first.Op == trace.OpTCPListen:
			listener = evs
		case first.Op == trace.OpTCPConnect:
			client = evs
		case first.Op == trace.OpPassiveEstablished:
			server = evs
		default:
			t.Errorf("a socket whose first event is %s:\n%s", first.Op, traceLines(evs))
		}
	}
	if len(listener) != 1 || listener[0].Local.String() != "127.0.0.1:7411" || listener[0].State != trace.StateListen {
		t.Errorf("listener: want one TCP_LISTEN_CB on 127.0.0.1:7411 in LISTEN (listeners get no callbacks of their own), got\n%s",
			traceLines(listener))
	}
	if len(client) == 0 || len(server) == 0 {
		t.Fatalf("no client or no server socket traced")
	}
	clientEnd, serverEnd := client[0].Local, client[0].Remote
	if serverEnd.String() != "127.0.0.1:7411" || clientEnd.Addr().String() != "127.0.0.1" || clientEnd.Port() == port {
		t.Errorf("client socket: %s > %s", clientEnd, serverEnd)
	}
	for _, ev := range client {
		if ev.Local != clientEnd || ev.Remote != serverEnd || ev.NetNS != ns {
			t.Errorf("client event with other ends or namespace (want netns %d): %s", ns, ev)
		}
	}
	for _, ev := range server {
		if ev.Local != serverEnd || ev.Remote != clientEnd || ev.NetNS != ns {
			t.Errorf("server event with other ends or namespace (want netns %d): %s", ns, ev)
		}
	}
	if !hasOp(client, trace.OpActiveEstablished) {
		t.Error("the client has no ACTIVE_ESTABLISHED_CB")
	}
	checkStateChain(t, "client", client, trace.StateSynSent)
	checkStateChain(t, "server", server, trace.StateSynRecv)
	if !slices.ContainsFunc(append(client, server...), func(ev trace.Event) bool { return ev.Op == trace.OpRTT && ev.SRTT > 0 }) {
		t.Error("no RTT_CB with a smoothed RTT")
	}
}

// Filters leave out other connections in BPF; two tracers and the datapath
// share the cgroup.
func TestTraceFilters(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	byPort := startTraceSession(t, trace.Options{PinDir: e.PinDir, Port: 7431})
	byAddr := startTraceSession(t, trace.Options{PinDir: e.PinDir, Addr: netip.MustParsePrefix("::1/128")})
	for i, listen := range []string{"127.0.0.1:7431", "[::1]:7432"} {
		tr := harness.Transfer{Listen: listen, Bytes: 1 << 20, Seed: 30 + uint64(i)}
		var res harness.TransferResult
		e.Run(harness.Scenario{Transfer: &tr}, &res)
		tr.Check(t, &res)
	}
	if c := e.Status().Counters; c.SocketsAdded != 4 || c.BytesRedirected != 4<<20 {
		t.Errorf("while tracing, want 4 sockets added and every byte redirected, got %+v", c)
	}
	allClosed := func(evs []trace.Event) bool { return closedSockets(evs) == 2 }
	for name, f := range map[string]struct {
		s    *traceSession
		keep func(trace.Event) bool
	}{
		"--port 7431": {byPort, func(ev trace.Event) bool { return ev.Local.Port() == 7431 || ev.Remote.Port() == 7431 }},
		"--addr ::1":  {byAddr, func(ev trace.Event) bool { return ev.Local.Addr().String() == "::1" }},
	} {
		events := f.s.waitFor("CLOSE of both sockets with "+name, 5*time.Second, allClosed)
		time.Sleep(100 * time.Millisecond) // time for events that should not be there
		events = f.s.snapshot()
		for _, ev := range events {
			if !f.keep(ev) {
				t.Errorf("%s let through %s", name, ev)
			}
		}
		for _, op := range []trace.Op{trace.OpTCPListen, trace.OpTCPConnect, trace.OpActiveEstablished, trace.OpPassiveEstablished} {
			if !hasOp(events, op) {
				t.Errorf("%s: no %s among\n%s", name, op, traceLines(events))
			}
		}
	}
}

// lineReader collects the lines a process writes.
type lineReader struct {
	mu    sync.Mutex
	lines []string
	done  chan struct{}
}

func readLines(r interface{ Read([]byte) (int, error) }) *lineReader {
	l := &lineReader{done: make(chan struct{})}
	go func() {
		defer close(l.done)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			l.mu.Lock()
			l.lines = append(l.lines, sc.Text())
			l.mu.Unlock()
		}
	}()
	return l
}

func (l *lineReader) snapshot() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.lines)
}

// waitLine waits for a line containing substr.
func (l *lineReader) waitLine(t *testing.T, substr string, timeout time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(timeout); ; time.Sleep(20 * time.Millisecond) {
		if slices.ContainsFunc(l.snapshot(), func(s string) bool { return strings.Contains(s, substr) }) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no line with %q within %v: %q", substr, timeout, l.snapshot())
		}
	}
}

// traceCLI is a running `sockredir trace`.
type traceCLI struct {
	cmd            *exec.Cmd
	stdout, stderr *lineReader
	exited         chan error
}

// startTraceCLI runs `sockredir trace` and waits until it has attached. It
// is started from a thread of its own that lives as long as it does: the
// SIGKILL it gets if this test process dies (Pdeathsig) follows the thread
// that started it.
func startTraceCLI(t *testing.T, args ...string) *traceCLI {
	t.Helper()
	c := &traceCLI{cmd: exec.Command(sockredirBinary(t), append([]string{"trace"}, args...)...), exited: make(chan error, 1)}
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := c.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	errOut, err := c.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	c.stdout, c.stderr = readLines(out), readLines(errOut)
	started := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		if err := c.cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		<-c.stdout.done // Wait closes the pipes: read them to the end first
		<-c.stderr.done
		c.exited <- c.cmd.Wait()
	}()
	if err := <-started; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.cmd.Process.Kill()
		<-c.exited
	})
	c.stderr.waitLine(t, "tracing", 10*time.Second)
	return c
}

// stop sends sig and returns how the trace exited.
func (c *traceCLI) stop(t *testing.T, sig syscall.Signal) error {
	t.Helper()
	if err := c.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-c.exited:
		c.exited <- err // for the cleanup
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("trace still runs 10s after %v", sig)
		return nil
	}
}

// waitSockOps waits until n sock_ops programs are attached to the cgroup.
func waitSockOps(t *testing.T, e *harness.Env, n int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); len(e.AttachedSockOps()) != n; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("sock_ops programs on the cgroup: %v, want %d", e.AttachedSockOps(), n)
		}
	}
}

func TestTraceCLI(t *testing.T) {
	e := harness.New(t)
	r := runCLI(t, nil, "trace", "--pin-dir", e.PinDir)
	if r.code != 1 || !strings.Contains(r.stderr, "sockredir is not up") || strings.Count(r.stderr, "\n") != 1 {
		t.Errorf("trace with nothing up: exit %d, want 1 and one line saying so: %q", r.code, r.stderr)
	}
	if r := runCLI(t, nil, "trace", "--pin-dir", e.PinDir, "--addr", "10.0.0.0/33"); r.code != 1 || !strings.Contains(r.stderr, "--addr") {
		t.Errorf("trace --addr 10.0.0.0/33: exit %d, want 1 and a line about --addr: %q", r.code, r.stderr)
	}
	e.Up(datapath.Config{})

	cli := startTraceCLI(t, "--pin-dir", e.PinDir, "--json", "--port", "7421")
	waitSockOps(t, e, 2)
	for i, listen := range []string{"127.0.0.1:7422", "127.0.0.1:7421"} {
		tr := harness.Transfer{Listen: listen, Bytes: 1 << 20, Seed: 20 + uint64(i)}
		var res harness.TransferResult
		e.Run(harness.Scenario{Transfer: &tr}, &res)
		tr.Check(t, &res)
	}
	cli.stdout.waitLine(t, `"new_state":"CLOSE"`, 5*time.Second)
	time.Sleep(100 * time.Millisecond) // the other socket's CLOSE
	if err := cli.stop(t, syscall.SIGINT); err != nil {
		t.Errorf("trace after SIGINT: %v, want exit 0", err)
	}
	waitSockOps(t, e, 1)

	ops := make(map[string]int)
	for _, line := range cli.stdout.snapshot() {
		var ev struct {
			Op         string `json:"op"`
			LocalPort  int    `json:"local_port"`
			RemotePort int    `json:"remote_port"`
			OldState   string `json:"old_state"`
			NewState   string `json:"new_state"`
		}
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Errorf("not a JSON object: %q: %v", line, err)
			continue
		}
		ops[ev.Op]++
		if ev.LocalPort != 7421 && ev.RemotePort != 7421 {
			t.Errorf("--port 7421 let through %s", line)
		}
		if (ev.Op == "STATE_CB") != (ev.OldState != "" && ev.NewState != "") {
			t.Errorf("old_state and new_state must come with STATE_CB and only with it: %s", line)
		}
	}
	want := map[string]int{"TCP_LISTEN_CB": 1, "TCP_CONNECT_CB": 1, "ACTIVE_ESTABLISHED_CB": 1, "PASSIVE_ESTABLISHED_CB": 1}
	for op, n := range want {
		if ops[op] != n {
			t.Errorf("%d %s, want %d; all ops: %v", ops[op], op, n, ops)
		}
	}
	if ops["STATE_CB"] < 4 || ops["RTT_CB"] < 1 {
		t.Errorf("want state changes through close and RTT samples, got %v", ops)
	}
}

// A trace killed with SIGKILL leaves nothing attached: its link was never
// pinned.
func TestTraceKilledDetaches(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	cli := startTraceCLI(t, "--pin-dir", e.PinDir)
	waitSockOps(t, e, 2)
	cli.stop(t, syscall.SIGKILL)
	waitSockOps(t, e, 1)
}

// xdpDropAll drops every packet that arrives on interface ifname of ns
// until the returned link is closed. XDP needs no kernel module (netem
// would, and some kernels lack it).
func xdpDropAll(t *testing.T, ns *sandbox.Netns, ifname string) link.Link {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.XDP,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1 /* XDP_DROP */), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	var l link.Link
	err = ns.Do(func() error {
		iface, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		l, err = link.AttachXDP(link.XDPOptions{Program: prog, Interface: iface.Index})
		return err
	})
	if err != nil {
		t.Fatalf("attaching the XDP drop program to %s: %v", ifname, err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// waitReceiveQueueFull waits until c's receive queue holds bytes and has
// stopped growing: its peer has filled the window and waits.
func waitReceiveQueueFull(t *testing.T, c *net.TCPConn) {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	queued := func() (n int) {
		raw.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
		return n
	}
	last, still := -1, 0
	for deadline := time.Now().Add(10 * time.Second); still < 5; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the receive queue never filled up (%d bytes)", last)
		}
		n := queued()
		if n > 0 && n == last {
			still++
		} else {
			still = 0
		}
		last = n
	}
}

// A connection that loses its packets on a veth shows RTOs and
// retransmissions; once the loss stops, it completes intact.
func TestTraceRetransmission(t *testing.T) {
	e := harness.New(t)
	peer := newPeerNamespace(t, e) // 10.78.0.1 here, 10.78.0.2 on the peer's end, sr1p
	e.Up(datapath.Config{})
	const port = 7441
	var ln net.Listener
	err := peer.Do(func() (err error) {
		// A small receive buffer, inherited by the accepted socket: the
		// client fills the window quickly, then waits for the server.
		lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 4096) })
			if err != nil {
				return err
			}
			return serr
		}}
		ln, err = lc.Listen(context.Background(), "tcp", "10.78.0.2:7441")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	s := startTraceSession(t, trace.Options{PinDir: e.PinDir, Port: port})

	tr := harness.Transfer{Dial: ln.Addr().String(), Bytes: 256 << 10, Seed: 41}
	agent := e.Start(harness.Scenario{Transfer: &tr}, time.Minute)
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(10 * time.Second))
	conn, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	server := conn.(*net.TCPConn)
	waitReceiveQueueFull(t, server)

	// From now on the client's segments are lost: when the server reads
	// and opens its window, what the client sends next never arrives.
	drop := xdpDropAll(t, peer, "sr1p")
	served := make(chan harness.Received, 1)
	serveErr := make(chan error, 1)
	go func() {
		got, err := harness.Exchange(server, tr.Bytes, tr.Seed+1)
		served <- got
		serveErr <- err
	}()
	s.waitFor("RTO_CB and RETRANS_CB", 20*time.Second, func(evs []trace.Event) bool {
		return hasOp(evs, trace.OpRTO) && hasOp(evs, trace.OpRetransmit)
	})
	drop.Close()

	var res harness.TransferResult
	if err := agent.Wait(&res); err != nil {
		t.Fatal(err)
	}
	if err := <-serveErr; err != nil {
		t.Fatal(err)
	}
	res.Server = []harness.Received{<-served}
	tr.Check(t, &res)

	events := s.waitFor("CLOSE of the client", 5*time.Second, func(evs []trace.Event) bool { return closedSockets(evs) == 1 })
	t.Logf("events:\n%s", traceLines(events))
	sockets := bySocket(events)
	if len(sockets) != 1 {
		t.Fatalf("want the client's socket alone (the server is outside the cgroup), got %d sockets", len(sockets))
	}
	for _, client := range sockets {
		if client[0].Op != trace.OpTCPConnect || client[0].Remote.String() != "10.78.0.2:7441" {
			t.Errorf("first event: %s, want TCP_CONNECT_CB to 10.78.0.2:7441", client[0])
		}
		checkStateChain(t, "client", client, trace.StateSynSent)
		for _, ev := range client {
			if ev.Op == trace.OpRetransmit && ev.RetransSegs < 1 {
				t.Errorf("RETRANS_CB without segments: %s", ev)
			}
			if ev.Op == trace.OpRTO && ev.RTOExpired {
				t.Errorf("RTO_CB says the connection gave up, yet it completed: %s", ev)
			}
		}
		if last := client[len(client)-1]; last.TotalRetrans < 1 {
			t.Errorf("the client's last event counts %d retransmitted segments: %s", last.TotalRetrans, last)
		}
	}
}

// A reader that falls behind loses events; they are counted, and Run warns.
func TestTraceLostEvents(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	logs, observed := observer.New(zap.InfoLevel)
	out, blocked := io.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan error, 1)
	go func() {
		// One page of ring holds about 30 events.
		opts := trace.Options{PinDir: e.PinDir, RingSize: uint32(os.Getpagesize())}
		ran <- trace.Run(ctx, opts, trace.JSON, blocked, zap.New(logs))
	}()
	waitLog := func(msg string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); observed.FilterMessageSnippet(msg).Len() == 0; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("no log %q: %v", msg, observed.All())
			}
		}
	}
	waitLog("tracing")

	// Nobody reads the output yet: Run blocks writing and the ring fills.
	tr := harness.Transfer{Listen: "127.0.0.1:7451", Bytes: 64 << 10, Seed: 51, Connections: 16}
	var res harness.TransferResult
	e.Run(harness.Scenario{Transfer: &tr}, &res)
	tr.Check(t, &res)
	go io.Copy(io.Discard, out)
	waitLog("events lost")
	cancel()
	if err := <-ran; err != nil {
		t.Errorf("Run: %v", err)
	}
	warning := observed.FilterMessageSnippet("events lost").All()[0]
	if lost := warning.ContextMap()["lost_total"]; lost == nil || lost.(uint64) == 0 {
		t.Errorf("the warning counts no lost events: %v", warning)
	}
}
