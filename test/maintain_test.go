package test

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/test/harness"
)

// checks adds up what a maintainer's checks did.
type checks struct {
	datapath.CheckResult
	notUp    int // checks that found the datapath down
	reopened int // checks that found new maps and moved to them
}

// runMaintainer checks e's datapath every 10 ms, as `sockredir daemon` does,
// until the returned function is called; that returns what the checks did.
// Errors fail the test; a check that finds the datapath down does only
// unless downExpected.
func runMaintainer(t *testing.T, e *harness.Env, maxBacklog uint64, downExpected bool) (stop func() checks) {
	maintainer, err := datapath.NewMaintainer(e.PinDir, maxBacklog)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	var total checks
	go func() {
		defer close(stopped)
		maintainer.Run(ctx, 10*time.Millisecond, func(res datapath.CheckResult, err error) {
			switch {
			case errors.Is(err, datapath.ErrNotUp) && downExpected:
				total.notUp++
			case err != nil:
				t.Errorf("checking the datapath: %v", err)
			}
			total.OverBacklog += res.OverBacklog
			total.Released += res.Released
			if res.Reopened {
				total.reopened++
			}
		})
	}()
	// Also when the test fails before it stops them: checks must not
	// outlive the test, nor run while the datapath is taken down.
	var once sync.Once
	halt := func() { once.Do(func() { cancel(); <-stopped }) }
	t.Cleanup(halt)
	return func() checks {
		halt()
		return total
	}
}

// runCase runs case c in e and fails the test for every error that the
// case's application saw.
func runCase(t *testing.T, e *harness.Env, c harness.Case) harness.CaseResult {
	t.Helper()
	var r harness.CaseResult
	e.Run(harness.Scenario{Case: &c}, &r)
	for who, err := range r.Errors {
		t.Errorf("%s: %s", who, err)
	}
	return r
}

// slowReaderBytes is what a slow reader's peer sends: enough that a sender
// is still sending when the upkeep notices the backlog, even on this
// project's host (a check every 10 ms, about 2 GB/s redirected).
const slowReaderBytes = 128 << 20

// slowReaderTransfer sends slowReaderBytes to a reader that starts reading
// after 2 s. Both sides stay connected a second after sending: a connection
// that both sides have shut down leaves TCP's tables, where the inspector
// looks (the sender has finished then, so its backlog can't grow).
func slowReaderTransfer(seed uint64) harness.Transfer {
	return harness.Transfer{Listen: "127.0.0.1:0", Bytes: slowReaderBytes, Seed: seed, OneWay: true,
		ServerReadDelay: 2 * time.Second, HoldOpen: time.Second}
}

// A reader that stops reading holds its sender back, as over plain TCP:
// with the maintainer checking (as `sockredir daemon` does), the
// connection goes on over TCP once the reader has more than the limit
// waiting, and every byte still arrives, in order.
func TestBacklogLimitHoldsSenderBack(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	stop := runMaintainer(t, e, slowReaderBytes/32, false)
	tr := slowReaderTransfer(21)
	var res harness.TransferResult
	e.Run(harness.Scenario{Transfer: &tr}, &res)
	stop()
	tr.Check(t, &res)
	c := e.Status().Counters
	t.Logf("%d of %d bytes redirected before the reader refused", c.BytesRedirected, slowReaderBytes)
	if c.InboundRefused != 1 || c.BytesPassed == 0 || c.BytesRedirected >= slowReaderBytes/2 {
		t.Errorf("want the reader to refuse once and most of the %d bytes to go over TCP; counters %+v", slowReaderBytes, c)
	}
}

// A connection that went back to TCP both ways leaves the map once its
// queues are read, and is a plain TCP socket again: FIONREAD counts its TCP
// bytes on every kernel (some count only redirected bytes while a socket is
// in a sockhash).
func TestSettledConnectionLeavesTheMap(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	stop := runMaintainer(t, e, 0, false)
	r := runCase(t, e, harness.Case{Name: "rcvlowat-then-fionread", Bytes: 1000})
	res := stop()
	if r.Values["fionread"] != 1000 {
		t.Errorf("FIONREAD after the connection went back to TCP: %d, want 1000", r.Values["fionread"])
	}
	if st := e.Status(); res.Released != 2 || st.Counters.InboundRefused != 1 || st.Sockets != 0 {
		t.Errorf("released %d sockets, %d left in the map, counters %+v; want 2 released, none left, one refusal",
			res.Released, st.Sockets, st.Counters)
	}
	if n := refusalsLeft(t, e); n != 0 {
		t.Errorf("%d refusals left after the release, want none: they would crowd out live ones", n)
	}
}

// A connection whose reader began to splice before its peer's first
// message goes back to TCP both ways once the upkeep has looked (the peer
// declines before it sends, then the splicer's own sends pass too), and
// leaves the map: FIONREAD then counts what arrives over TCP. Where the
// splice guard loads, splice fails, the reader reads instead and the
// connection stays accelerated.
func TestSplicingConnectionLeavesTheMap(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	stop := runMaintainer(t, e, 0, false)
	r := runCase(t, e, harness.Case{Name: "splice-then-fionread", Bytes: 1 << 20})
	res := stop()
	if got := r.Received["client"]; !got.Intact() {
		t.Errorf("the splice reader read %d bytes, want the %d sent, intact", got.Bytes, got.WantSize)
	}
	st := e.Status()
	if st.SpliceGuard {
		if r.Values["read fallback"] != 1 || st.Counters.BytesRedirected == 0 {
			t.Errorf("with the splice guard, want the reader to read and the answer redirected; fallback %d, counters %+v",
				r.Values["read fallback"], st.Counters)
		}
		return
	}
	if r.Values["fionread"] != 1000 {
		t.Errorf("FIONREAD at the splice reader: %d, want the 1000 bytes waiting", r.Values["fionread"])
	}
	// Released before the server's first answer, a second after the
	// splice began: then no message of the connection met sk_msg.
	if c := st.Counters; res.Released != 2 || c.BytesRedirected != 0 || c.MessagesPassed != 0 || c.PairsDeclined != 1 {
		t.Errorf("released %d sockets, counters %+v; want both released before any message, the peer declined once",
			res.Released, c)
	}
	if n := refusalsLeft(t, e); n != 0 {
		t.Errorf("%d refusals left after the release, want none", n)
	}
}

// A splice reader whose connection went back to TCP for another reason
// (here SO_RCVLOWAT) can't read what was redirected to it before. Where the
// splice guard can't load, the upkeep aborts it as it does any splice
// reader whose queue nobody reads: an error, not a stream with a hole that
// ends cleanly. Where the guard loads, splice fails and the reader reads
// everything, as over plain TCP.
func TestSpliceAfterARefusal(t *testing.T) {
	splicerPlainAndUpkept(t, func(t *testing.T, e *harness.Env, guarded bool) {
		var r harness.CaseResult
		e.Run(harness.Scenario{Case: &harness.Case{Name: "rcvlowat-then-splice", Bytes: 64 << 10}}, &r)
		got := r.Received["server"]
		if guarded {
			if !got.Intact() || r.Errors["server"] != "" {
				t.Errorf("the reader read %d of %d bytes intact=%v (error %q), want all of them",
					got.Bytes, got.WantSize, got.Intact(), r.Errors["server"])
			}
			return
		}
		if got.Intact() || r.Errors["server"] == "" {
			t.Errorf("the reader read %d of %d bytes intact=%v and ended with error %q; "+
				"without the splice guard, want the connection aborted", got.Bytes, got.WantSize, got.Intact(), r.Errors["server"])
		}
	})
}

// A socket that redirected to a splice reader keeps doing so when it
// refuses redirected bytes itself (here SO_RCVLOWAT): its bytes over TCP
// would reach splice ahead of those it redirected, a hole. Where the splice
// guard can't load, the reader, which can't read what was redirected, is
// aborted having read a prefix of the stream (nothing, here); where it
// loads, the reader reads everything.
func TestRefusalToASpliceReader(t *testing.T) {
	const size = 64 << 10
	splicerPlainAndUpkept(t, func(t *testing.T, e *harness.Env, guarded bool) {
		var r harness.CaseResult
		e.Run(harness.Scenario{Case: &harness.Case{Name: "refusal-to-splice-reader", Bytes: size}}, &r)
		received, prefix := r.Values["received"], r.Values["prefix_matches"] == 1
		switch {
		case !prefix:
			t.Errorf("the splice reader read %d bytes with a hole in them", received)
		case guarded && (received != 2*size || r.Errors["server"] != ""):
			t.Errorf("the reader read %d of %d bytes (error %q), want all of them", received, 2*size, r.Errors["server"])
		case !guarded && r.Errors["server"] == "":
			t.Errorf("the splice reader read %d of %d bytes and saw no error; want its connection aborted", received, 2*size)
		}
	})
}

// splicerPlainAndUpkept runs test over plain TCP and with sockredir and
// its upkeep. guarded says whether splice reads are safe there: over plain
// TCP, or where the splice guard loads; elsewhere, the upkeep must be able
// to abort a splice reader's connection (requireAborts).
func splicerPlainAndUpkept(t *testing.T, test func(t *testing.T, e *harness.Env, guarded bool)) {
	for _, accelerated := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "sockredir"}[accelerated], func(t *testing.T) {
			e := harness.New(t)
			guarded := true
			if accelerated {
				e.Up(datapath.Config{})
				defer runMaintainer(t, e, 0, false)()
				guarded = e.Status().SpliceGuard
			}
			if !guarded {
				requireAborts(t)
			}
			test(t, e, guarded)
		})
	}
}

// requireAborts skips t where the upkeep can't abort a connection
// (bpf_sock_destroy, 6.5 and later): there such a splice reader waits for
// its peer to close (docs/correctness.md).
func requireAborts(t *testing.T) {
	t.Helper()
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		t.Fatal(err)
	}
	var fn *btf.Func
	if err := spec.TypeByName("bpf_sock_destroy", &fn); err != nil {
		t.Skipf("this kernel has no bpf_sock_destroy: %v", err)
	}
}

// refusalsLeft counts the entries of e's refusals map.
func refusalsLeft(t *testing.T, e *harness.Env) int {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(e.PinDir, "refusals"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var key []byte
	var why uint32
	n := 0
	it := m.Iterate()
	for it.Next(&key, &why) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// tcp_bpf can fail a blocking recv(2) with EAGAIN, and sock_ops can't tell
// that an accepted socket will block. The maintainer can: it puts such a
// connection back on TCP and remembers the server's port, so the next
// connection to it stays on TCP from the start.
func TestBlockingServerLearned(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	stop := runMaintainer(t, e, 0, false)
	runCase(t, e, harness.Case{Name: "blocking-server-twice", Bytes: 4096})
	res := stop()
	st := e.Status()
	// The first connection goes back to TCP and is released: before its
	// first byte or after its echo, as the checks fall. The second one's
	// client gets in at ACTIVE_ESTABLISHED and leaves again when its server
	// refuses from the start.
	if c := st.Counters; c.SocketsAdded != 3 || c.InboundRefused != 2 || res.Released != 2 {
		t.Errorf("counters %+v, released %d; want the first connection put back on TCP and released, "+
			"and the second one on TCP from the start", c, res.Released)
	}
	if len(st.RefusingPorts) != 1 || st.RefusingPorts[0].Reason != "blocking reads" {
		t.Errorf("ports kept on TCP: %+v, want the server's, for its blocking reads", st.RefusingPorts)
	}
}

// After a `down` and a new `up` (by hand, beside a running daemon), the
// maintainer looks after the new maps: a settled connection is released
// from them.
func TestMaintainerFollowsANewUp(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	stop := runMaintainer(t, e, 0, true)
	if _, err := datapath.Down(datapath.DownOptions{PinDir: e.PinDir}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	e.Up(datapath.Config{})
	runCase(t, e, harness.Case{Name: "rcvlowat-then-fionread", Bytes: 1000})
	res := stop()
	if res.notUp == 0 || res.reopened != 1 || res.Released != 2 {
		t.Errorf("%d checks found the datapath down, %d moved to new maps, %d sockets released; want some, 1, 2",
			res.notUp, res.reopened, res.Released)
	}
	if st := e.Status(); st.Sockets != 0 {
		t.Errorf("%d sockets left in the new map, want none", st.Sockets)
	}
}
