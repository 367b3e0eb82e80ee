package test

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/test/harness"
)

// Probation, sockredir's default: a server port's connections stay on plain
// TCP, watched, until one of them ends having shown that the port's server
// reads in a way tcp_bpf gets right (bpf/sockops.c). These tests keep it on.

func upWithProbation(t *testing.T) *harness.Env {
	e := harness.New(t)
	e.Probation = true
	e.Up(datapath.Config{})
	return e
}

// waitForStatus polls the status until ok holds, for what is settled only
// once a connection's sockets are closed.
func waitForStatus(t *testing.T, e *harness.Env, what string, ok func(datapath.Status) bool) datapath.Status {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		st := e.Status()
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("waited 5 s for %s; status %+v", what, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// awaitCleared waits until sockredir has cleared the server port addr, which
// happens when a connection to it closes after its server read as tcp_bpf
// needs (probation).
func awaitCleared(t *testing.T, e *harness.Env, addr string) {
	t.Helper()
	waitForStatus(t, e, addr+" to be cleared", func(st datapath.Status) bool {
		return slices.ContainsFunc(st.ClearedPorts, func(p datapath.ServerPort) bool { return p.String() == addr })
	})
}

// A port's first connection goes over TCP. Once it has ended, its server
// having read from a non-blocking socket with recv(2), the port is cleared
// and its next connection is accelerated.
func TestProbationClearsAPort(t *testing.T) {
	e := upWithProbation(t)
	tr := harness.Transfer{Listen: "127.0.0.1:7301", Bytes: 1 << 20, Seed: 41}
	var first harness.TransferResult
	e.Run(harness.Scenario{Transfer: &tr}, &first)
	tr.Check(t, &first)
	if c := e.Status().Counters; c.BytesRedirected != 0 || c.SocketsAdded != 0 || c.ProbationConnections != 1 {
		t.Errorf("first connection: counters %+v, want it on TCP, on probation", c)
	}
	st := waitForStatus(t, e, "the port to be cleared", func(st datapath.Status) bool { return st.Counters.PortsCleared == 1 })
	if !slices.ContainsFunc(st.ClearedPorts, func(p datapath.ServerPort) bool { return p.String() == "127.0.0.1:7301" }) {
		t.Errorf("cleared ports %v, want 127.0.0.1:7301", st.ClearedPorts)
	}

	tr.Seed = 43
	var next harness.TransferResult
	e.Run(harness.Scenario{Transfer: &tr}, &next)
	tr.Check(t, &next)
	if c := e.Status().Counters; c.BytesRedirected != uint64(2*tr.Bytes) || c.SocketsAdded != 2 || c.ProbationConnections != 1 {
		t.Errorf("next connection: counters %+v, want both of its streams redirected", c)
	}
}

// A Go relay reads with splice(2), which can't see redirected bytes. On
// probation its connections stay on TCP, where splice reads everything, and
// both of the relay's ports stay there: the one it serves and the one it
// splices from as a client. No upkeep is needed for that, on any kernel.
func TestProbationKeepsSpliceReadersOnTCP(t *testing.T) {
	e := upWithProbation(t)
	r := runCase(t, e, harness.Case{Name: "splice-relay", Bytes: 8 << 20})
	for _, p := range checkIntactNoErrors(&r) {
		t.Error(p)
	}
	st := e.Status()
	if st.Counters.BytesRedirected != 0 || st.Counters.PortsCleared != 0 {
		t.Errorf("counters %+v, want nothing redirected and no port cleared", st.Counters)
	}
	if len(st.RefusingPorts) != 2 || st.RefusingPorts[0].Reason != "splice" || st.RefusingPorts[1].Reason != "splice" {
		t.Errorf("ports kept on TCP: %+v, want the relay's and its upstream's, for splice", st.RefusingPorts)
	}
}

// ioUringSpliceReaders are the cases of a reader built on io_uring: it
// splices with IORING_OP_SPLICE, no system call, naming the socket by its
// descriptor or by its index among the ring's registered files.
var ioUringSpliceReaders = []string{"io-uring-splice-reader", "io-uring-fixed-splice-reader"}

// The splice guard sees an io_uring splice in the io_uring worker that runs
// it, the splice watch at its submission: on probation, its port stays on
// TCP as a splice(2) reader's does, on every kernel.
func TestProbationKeepsIoUringSpliceReadersOnTCP(t *testing.T) {
	requireIoUring(t)
	for _, reader := range ioUringSpliceReaders {
		t.Run(reader, func(t *testing.T) {
			e := upWithProbation(t)
			r := runCase(t, e, harness.Case{Name: reader, Bytes: 1 << 20, Target: "127.0.0.1:7306"})
			for _, p := range checkIntactNoErrors(&r) {
				t.Error(p)
			}
			st := e.Status()
			if st.Counters.BytesRedirected != 0 {
				t.Errorf("counters %+v, want nothing redirected", st.Counters)
			}
			if !slices.ContainsFunc(st.RefusingPorts, func(p datapath.RefusingPort) bool {
				return p.String() == "127.0.0.1:7306" && p.Reason == "splice"
			}) {
				t.Errorf("ports kept on TCP: %+v, want 127.0.0.1:7306 for splice", st.RefusingPorts)
			}
		})
	}
}

// FIONREAD counts every waiting byte on both connections to a port, also on
// kernels whose tcp_bpf can't count redirected bytes (6.1): there the guard
// keeps the port on TCP once its probation connection asks.
func TestProbationFIONREAD(t *testing.T) {
	e := upWithProbation(t)
	r := runCase(t, e, harness.Case{Name: "fionread", Bytes: 1000})
	for _, name := range []string{"fionread", "fionread_next_connection"} {
		if r.Values[name] != 1000 {
			t.Errorf("%s: FIONREAD says %d bytes are waiting, want 1000", name, r.Values[name])
		}
	}
	st := e.Status()
	if st.Counters.BytesRedirected != 0 {
		t.Errorf("counters %+v: a server that never reads must not clear its port", st.Counters)
	}
	if st.FIONREADGuard && (len(st.RefusingPorts) != 1 || st.RefusingPorts[0].Reason != "FIONREAD") {
		t.Errorf("ports kept on TCP: %+v, want the server's, for FIONREAD", st.RefusingPorts)
	}
}

// A blocking server can get EAGAIN from a blocking recv(2) on an
// accelerated socket. Its probation connection shows that it blocks, so its
// port stays on TCP, without the daemon's upkeep.
func TestProbationKeepsBlockingServersOnTCP(t *testing.T) {
	e := upWithProbation(t)
	runCase(t, e, harness.Case{Name: "blocking-server-twice", Bytes: 4096})
	st := waitForStatus(t, e, "the server's port to be kept on TCP", func(st datapath.Status) bool { return len(st.RefusingPorts) > 0 })
	if c := st.Counters; c.BytesRedirected != 0 || c.SocketsAdded != 0 || c.PortsCleared != 0 || c.ProbationConnections != 1 {
		t.Errorf("counters %+v, want the first connection on probation and the second on TCP from the start", c)
	}
	if len(st.RefusingPorts) != 1 || st.RefusingPorts[0].Reason != "blocking reads" {
		t.Errorf("ports kept on TCP: %+v, want the server's, for its blocking reads", st.RefusingPorts)
	}
}

// A connection that carries nothing, as a health check's, shows nothing of
// how its server reads a stream: its end leaves the port on probation, and
// the next connection, which carries data, is the one that clears it.
func TestProbationIgnoresEmptyConnections(t *testing.T) {
	e := upWithProbation(t)
	// The client sends nothing and half-closes; the server reads the EOF
	// and closes.
	check := harness.Transfer{Listen: "127.0.0.1:7303", OneWay: true, ServerAnswersEOF: true}
	var checked harness.TransferResult
	e.Run(harness.Scenario{Transfer: &check}, &checked)
	check.Check(t, &checked)
	st := waitForStatus(t, e, "the health check's probation to end", func(st datapath.Status) bool {
		return st.Counters.ProbationConnections == 1 && st.ProbationSockets == 0
	})
	if st.Counters.PortsCleared != 0 {
		t.Fatalf("counters %+v: a connection that carried nothing cleared its port", st.Counters)
	}

	tr := harness.Transfer{Listen: "127.0.0.1:7303", Bytes: 64 << 10, Seed: 47, ServerAnswersEOF: true}
	var res harness.TransferResult
	e.Run(harness.Scenario{Transfer: &tr}, &res)
	tr.Check(t, &res)
	st = waitForStatus(t, e, "the port to be cleared", func(st datapath.Status) bool { return st.Counters.PortsCleared == 1 })
	if c := st.Counters; c.BytesRedirected != 0 || c.ProbationConnections != 2 {
		t.Errorf("counters %+v, want the transfer on probation, over TCP", c)
	}
}

// A service whose port was cleared starts to read with splice(2), or with
// io_uring's splice. Where the splice guard loads, every such splice fails
// with EINVAL and the reader falls back to read(2): the connections stay
// accelerated, and whole. Where it can't, the first spliced connection loses
// what was redirected to it (docs/correctness.md, known limitations), but
// the port is marked at that splice, without the upkeep, and the next
// connection stays on TCP, whole, though its client had sent everything and
// closed before the server read.
func TestProbationSpliceReaderAfterClearing(t *testing.T) {
	for _, reader := range append([]string{"splice-reader"}, ioUringSpliceReaders...) {
		t.Run(reader, func(t *testing.T) {
			if strings.HasPrefix(reader, "io-uring-") {
				requireIoUring(t)
			}
			e := upWithProbation(t)
			tr := harness.Transfer{Listen: "127.0.0.1:7305", Bytes: 64 << 10, Seed: 51, ServerAnswersEOF: true}
			var res harness.TransferResult
			e.Run(harness.Scenario{Transfer: &tr}, &res)
			tr.Check(t, &res)
			awaitCleared(t, e, "127.0.0.1:7305")

			var r harness.CaseResult
			e.Run(harness.Scenario{Case: &harness.Case{Name: reader, Bytes: 1 << 20, Target: "127.0.0.1:7305"}}, &r)
			st := e.Status()
			first := r.Received["server"]
			firstWhole := first.Intact() && r.Errors["server"] == ""
			for _, suffix := range []string{"", " next connection"} {
				got := r.Received["server"+suffix]
				whole := got.Intact() && r.Errors["server"+suffix] == ""
				fellBack := r.Values["read fallback"+suffix] == 1
				switch {
				case st.SpliceGuard && (!whole || !fellBack):
					t.Errorf("connection%s: read %d of %d bytes intact=%v (fell back to read: %v, error %q), want all of it after EINVAL",
						suffix, got.Bytes, got.WantSize, got.Intact(), fellBack, r.Errors["server"+suffix])
				case !st.SpliceGuard && suffix != "" && !whole:
					t.Errorf("next connection: read %d of %d bytes intact=%v (error %q), want all of it over TCP",
						got.Bytes, got.WantSize, got.Intact(), r.Errors["server"+suffix])
				}
			}
			if st.SpliceGuard {
				return
			}
			if !slices.ContainsFunc(st.RefusingPorts, func(p datapath.RefusingPort) bool {
				return p.String() == "127.0.0.1:7305" && p.Reason == "splice"
			}) {
				t.Errorf("ports kept on TCP: %+v, want 127.0.0.1:7305 for splice", st.RefusingPorts)
			}
			// Were the mark to fall out of its LRU map, the port must
			// go through probation again, not be accelerated at once.
			if slices.ContainsFunc(st.ClearedPorts, func(p datapath.ServerPort) bool { return p.String() == "127.0.0.1:7305" }) {
				t.Errorf("cleared ports: %+v, want 127.0.0.1:7305 no longer cleared once marked", st.ClearedPorts)
			}
			if c := st.Counters; c.BytesRedirected > 1<<20 {
				t.Errorf("counters %+v: want only the first spliced connection redirected", c)
			}
			if firstWhole {
				t.Fatal("known-bad case passed (the first spliced connection without the splice guard): update docs/correctness.md")
			}
			t.Skipf("KNOWN-BAD: without the splice guard the first spliced connection read %d of %d bytes", first.Bytes, first.WantSize)
		})
	}
}

// A connection that lasts (a proxy's pool) would hold its port on probation
// for as long. With the upkeep, once the connection has been watched for a
// second with its server reading data, non-blocking, the port is cleared
// while it is still open, and the next connection is accelerated; the first
// stays on TCP. Both whole.
func TestProbationClearsAPortWhileItsConnectionLasts(t *testing.T) {
	e := upWithProbation(t)
	defer runMaintainer(t, e, 0, false)()
	// What operators see meanwhile: the first connection's two sockets on
	// probation (sockredir_probation_sockets).
	watching := make(chan struct{})
	mostWatched := make(chan int)
	go func() {
		most := 0
		for {
			select {
			case <-watching:
				mostWatched <- most
				return
			case <-time.After(50 * time.Millisecond):
			}
			if u, err := datapath.ReadUsage(e.PinDir); err == nil {
				most = max(most, u.ProbationSockets)
			}
		}
	}()
	var r harness.CaseResult
	e.Run(harness.Scenario{Case: &harness.Case{Name: "lasting-connection", Bytes: 1 << 20, Target: "127.0.0.1:7306"}}, &r)
	close(watching)
	if most := <-mostWatched; most != 2 {
		t.Errorf("at most %d sockets on probation at once, want the first connection's 2", most)
	}
	for who, got := range r.Received {
		if !got.Intact() || r.Errors[who] != "" {
			t.Errorf("%s read %d of %d bytes intact=%v (error %q)", who, got.Bytes, got.WantSize, got.Intact(), r.Errors[who])
		}
	}
	if len(r.Received) != 4 {
		t.Errorf("results from %d sockets, want 4: %+v", len(r.Received), r)
	}
	if c := e.Status().Counters; c.BytesRedirected != 2<<20 || c.ProbationConnections != 1 || c.PortsCleared != 1 {
		t.Errorf("counters %+v, want the next connection's streams redirected and only the first on probation", c)
	}
}

// The splice watch finds probation sockets in an LRU map; one that fell out
// of it could splice unseen. Its port then stays on TCP instead of being
// cleared. (The test empties the map while the first connection lasts, as
// a flood of other probation connections would.)
func TestProbationWatchLost(t *testing.T) {
	e := upWithProbation(t)
	done := make(chan harness.CaseResult)
	go func() {
		var r harness.CaseResult
		e.Run(harness.Scenario{Case: &harness.Case{Name: "lasting-connection", Bytes: 1 << 20, Target: "127.0.0.1:7307"}}, &r)
		done <- r
	}()
	waitForStatus(t, e, "the first connection's sockets on probation", func(datapath.Status) bool {
		u, err := datapath.ReadUsage(e.PinDir)
		return err == nil && u.ProbationSockets == 2
	})
	watched, err := ebpf.LoadPinnedMap(filepath.Join(e.PinDir, "probation_sockets"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer watched.Close()
	var cookie uint64
	var port []byte
	var cookies []uint64
	for it := watched.Iterate(); it.Next(&cookie, &port); {
		cookies = append(cookies, cookie)
	}
	for _, c := range cookies {
		if err := watched.Delete(c); err != nil {
			t.Fatal(err)
		}
	}
	r := <-done
	for who, got := range r.Received {
		if !got.Intact() || r.Errors[who] != "" {
			t.Errorf("%s read %d of %d bytes intact=%v (error %q)", who, got.Bytes, got.WantSize, got.Intact(), r.Errors[who])
		}
	}
	st := waitForStatus(t, e, "127.0.0.1:7307 to be kept on TCP", func(st datapath.Status) bool { return len(st.RefusingPorts) > 0 })
	if len(st.RefusingPorts) != 1 || st.RefusingPorts[0].String() != "127.0.0.1:7307" || st.RefusingPorts[0].Reason != "probation watch lost" {
		t.Errorf("ports kept on TCP: %+v, want 127.0.0.1:7307, its probation watch lost", st.RefusingPorts)
	}
	if len(st.ClearedPorts) != 0 || st.Counters.BytesRedirected != 0 {
		t.Errorf("cleared ports %+v, counters %+v: want nothing cleared for good and nothing redirected", st.ClearedPorts, st.Counters)
	}
}
