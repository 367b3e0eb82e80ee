package test

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/sandbox"
	"github.com/sockredir/sockredir/test/harness"
)

// slowTransfer lasts a second or two: a reader that pauses before each read.
func slowTransfer(seed uint64) harness.Transfer {
	return harness.Transfer{Listen: "127.0.0.1:0", Bytes: 4 << 20, Seed: seed, ReadPause: 15 * time.Millisecond}
}

// down while connections stream: they carry on over TCP and lose nothing,
// and down finishes once the readers have caught up.
func TestDownWhileStreaming(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	tr := slowTransfer(10)
	agent := e.Start(harness.Scenario{Transfer: &tr}, time.Minute)
	time.Sleep(300 * time.Millisecond)
	wasUp, err := datapath.Down(datapath.DownOptions{PinDir: e.PinDir})
	if err != nil || !wasUp {
		t.Fatalf("down while streaming: %v (was up: %v)", err, wasUp)
	}
	var res harness.TransferResult
	if err := agent.Wait(&res); err != nil {
		t.Fatal(err)
	}
	tr.Check(t, &res)
	if _, err := os.Stat(e.PinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pins left after down: %v", err)
	}
}

// A reader that doesn't read: down stops accelerating, keeps the socket that
// holds its bytes, and says so; once the reader has read, down completes.
func TestDownWaitsForReaders(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	tr := harness.Transfer{Listen: "127.0.0.1:0", Bytes: 1 << 20, Seed: 11, OneWay: true, ServerReadDelay: 3 * time.Second}
	agent := e.Start(harness.Scenario{Transfer: &tr}, time.Minute)
	time.Sleep(500 * time.Millisecond)

	_, err := datapath.Down(datapath.DownOptions{PinDir: e.PinDir, DrainTimeout: 500 * time.Millisecond})
	if !errors.Is(err, datapath.ErrUnreadData) {
		t.Fatalf("down with an unread queue: %v, want ErrUnreadData", err)
	}
	st := e.Status()
	if st.Up || st.RedirectEnabled || st.UnreadSockets == 0 {
		t.Errorf("after an unfinished down: up %v, redirecting %v, %d sockets that may hold unread data; want false, false, some",
			st.Up, st.RedirectEnabled, st.UnreadSockets)
	}
	var res harness.TransferResult
	if err := agent.Wait(&res); err != nil {
		t.Fatal(err)
	}
	tr.Check(t, &res)
	if _, err := datapath.Down(datapath.DownOptions{PinDir: e.PinDir}); err != nil {
		t.Fatalf("down after the reader caught up: %v", err)
	}
}

// An up that comes while a down waits for a reader (a daemon restarted, a
// SIGHUP, a hand) waits for the down to finish, then attaches anew: it
// doesn't attach under the down, which would go on taking sockets out of
// the map and unpin what the up made.
func TestUpWaitsForARunningDown(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	tr := harness.Transfer{Listen: "127.0.0.1:0", Bytes: 1 << 20, Seed: 13, OneWay: true, ServerReadDelay: 2 * time.Second}
	agent := e.Start(harness.Scenario{Transfer: &tr}, time.Minute)
	time.Sleep(500 * time.Millisecond)

	downEnded := make(chan time.Time, 1)
	go func() {
		if _, err := datapath.Down(datapath.DownOptions{PinDir: e.PinDir, DrainTimeout: 20 * time.Second}); err != nil {
			t.Errorf("down: %v", err)
		}
		downEnded <- time.Now()
	}()
	time.Sleep(300 * time.Millisecond) // down is waiting for the reader now
	if res := e.Up(datapath.Config{}); res != datapath.Attached {
		t.Errorf("up after the down: %s, want %s", res, datapath.Attached)
	}
	upEnded := time.Now()
	if ended := <-downEnded; upEnded.Before(ended) {
		t.Errorf("up finished %s before the down it came during", ended.Sub(upEnded))
	}
	var res harness.TransferResult
	if err := agent.Wait(&res); err != nil {
		t.Fatal(err)
	}
	tr.Check(t, &res)
	if st := e.Status(); !st.Up || !st.RedirectEnabled {
		t.Errorf("after down and then up: up %v, redirecting %v; want both", st.Up, st.RedirectEnabled)
	}
}

// up over a different build swaps the programs in place while connections
// stream; nothing is lost or reset. The pinned program is replaced by an
// unrelated one so that up sees other programs than its own.
func TestUpgradeWhileStreaming(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	tr := slowTransfer(12)
	agent := e.Start(harness.Scenario{Transfer: &tr}, time.Minute)
	time.Sleep(300 * time.Millisecond)

	repin(t, e, "prog_sockops", otherProgram(t, ebpf.SockOps))
	if res := e.Up(datapath.Config{}); res != datapath.Upgraded {
		t.Fatalf("up over other programs: %s, want %s", res, datapath.Upgraded)
	}
	var res harness.TransferResult
	if err := agent.Wait(&res); err != nil {
		t.Fatal(err)
	}
	tr.Check(t, &res)
	if c := e.Status().Counters; c.BytesRedirected != uint64(2*tr.Bytes) {
		t.Errorf("want all %d bytes redirected across the upgrade, got %+v", 2*tr.Bytes, c)
	}
	if ids := e.AttachedSockOps(); len(ids) != 1 {
		t.Errorf("sock_ops programs attached after the upgrade: %v, want one", ids)
	}
}

// up with the same build attaches the guards afresh: a build that changed
// only them gets them in place, and a guard link that went missing returns.
func TestUpAgainRestoresGuards(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	guards := guardPins(t, e)
	for _, pin := range guards {
		if err := os.Remove(pin); err != nil {
			t.Fatal(err)
		}
	}
	if res := e.Up(datapath.Config{}); res != datapath.AlreadyUp {
		t.Fatalf("second up: %s, want %s", res, datapath.AlreadyUp)
	}
	for _, pin := range guards {
		if _, err := os.Stat(pin); err != nil {
			t.Errorf("guard link %s not back after up: %v", filepath.Base(pin), err)
		}
	}
}

// guardPins are the pins of the guards' links (the splice guard and the
// FIONREAD guard, or the splice watch) in e's pin directory.
func guardPins(t *testing.T, e *harness.Env) []string {
	t.Helper()
	pins, err := filepath.Glob(filepath.Join(e.PinDir, "link_*"))
	if err != nil {
		t.Fatal(err)
	}
	pins = slices.DeleteFunc(pins, func(pin string) bool {
		return strings.HasSuffix(pin, "/link_sockops") || strings.HasSuffix(pin, "/link_setsockopt")
	})
	if len(pins) == 0 {
		t.Fatal("up attached neither a splice guard nor a splice watch")
	}
	return pins
}

// pinnedLinkID is the id of the link pinned at pin.
func pinnedLinkID(t *testing.T, pin string) link.ID {
	t.Helper()
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		t.Fatal(err)
	}
	return info.ID
}

// stageLink pins the link with id beside pin, as an up killed while it
// replaced a guard leaves it.
func stageLink(t *testing.T, pin string, id link.ID) {
	t.Helper()
	l, err := link.NewFromID(id)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := l.Pin(pin + "_staged"); err != nil {
		t.Fatal(err)
	}
}

// linkLingers reports whether the link with id still exists after a
// second: bpffs lets go of an unpinned object only after an RCU grace
// period.
func linkLingers(id link.ID) bool {
	for deadline := time.Now().Add(time.Second); ; time.Sleep(10 * time.Millisecond) {
		l, err := link.NewFromID(id)
		if err != nil {
			return false
		}
		l.Close()
		if time.Now().After(deadline) {
			return true
		}
	}
}

// up replaces each guard's link with a new one and detaches the old one;
// what an up killed half-way through that leaves behind, the next up and
// down clear away.
func TestUpAgainReplacesGuards(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	old := map[string]link.ID{}
	for _, pin := range guardPins(t, e) {
		old[pin] = pinnedLinkID(t, pin)
		stageLink(t, pin, old[pin])
	}
	if res := e.Up(datapath.Config{}); res != datapath.AlreadyUp {
		t.Fatalf("second up: %s, want %s", res, datapath.AlreadyUp)
	}
	for pin, id := range old {
		if now := pinnedLinkID(t, pin); now == id {
			t.Errorf("%s still holds link %d after up", filepath.Base(pin), id)
		}
		if linkLingers(id) {
			t.Errorf("the replaced link %d of %s is still attached", id, filepath.Base(pin))
		}
		if _, err := os.Stat(pin + "_staged"); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s_staged left after up: %v", filepath.Base(pin), err)
		}
		stageLink(t, pin, pinnedLinkID(t, pin))
	}
	if _, err := datapath.Down(datapath.DownOptions{PinDir: e.PinDir}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(e.PinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory left after down, with a staged guard link in it: %v", err)
	}
}

// repin pins prog as name in e's pin directory, in place of sockredir's.
func repin(t *testing.T, e *harness.Env, name string, prog *ebpf.Program) {
	t.Helper()
	pin := filepath.Join(e.PinDir, name)
	if err := os.Remove(pin); err != nil {
		t.Fatal(err)
	}
	if err := prog.Pin(pin); err != nil {
		t.Fatal(err)
	}
}

// otherProgram loads a program of type typ that isn't sockredir's.
func otherProgram(t *testing.T, typ ebpf.ProgramType) *ebpf.Program {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         typ,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog
}

// A cgroup link on another program than the pins name (left by a build
// that pinned the programs before it swapped them, and whose swap failed, or
// by anyone's hand) must not pass for "already up": the next up finishes the
// swap.
func TestUpFinishesHalfDoneUpgrade(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	l, err := link.LoadPinnedLink(filepath.Join(e.PinDir, "link_sockops"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := l.Update(otherProgram(t, ebpf.SockOps)); err != nil {
		t.Fatal(err)
	}

	if res := e.Up(datapath.Config{}); res != datapath.Upgraded {
		t.Fatalf("up over a link running another program: %s, want %s", res, datapath.Upgraded)
	}
	pinned, err := ebpf.LoadPinnedProgram(filepath.Join(e.PinDir, "prog_sockops"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pinned.Close()
	info, err := pinned.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	if attached := e.AttachedSockOps(); len(attached) != 1 || attached[0] != id {
		t.Errorf("sock_ops programs attached: %v, want sockredir's (%d)", attached, id)
	}
	if c := transferOn(t, e, "127.0.0.1:0", 14); c.BytesRedirected == 0 {
		t.Errorf("not accelerating after the upgrade was finished: %+v", c)
	}
}

// An upgrade killed between attaching its sk_msg program and pinning it
// leaves the pin naming the old program: down still finishes.
func TestDownAfterUpgradeKilledBeforePinning(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	repin(t, e, "prog_redirect", otherProgram(t, ebpf.SkMsg))
	if wasUp, err := datapath.Down(datapath.DownOptions{PinDir: e.PinDir}); err != nil || !wasUp {
		t.Fatalf("down with a stale sk_msg pin: %v (was up: %v)", err, wasUp)
	}
	if _, err := os.Stat(e.PinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pins left after down: %v", err)
	}
}

// A loader killed between detaching and unpinning leaves maps without a
// cgroup link; the next up attaches again and the next down finishes.
func TestUpRecoversFromInterruptedDown(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	// What a down killed between its two unpins leaves: the setsockopt
	// link, which the next up takes over.
	if err := os.Remove(filepath.Join(e.PinDir, "link_sockops")); err != nil {
		t.Fatal(err)
	}
	waitDetached(t, e, true)
	if res := e.Up(datapath.Config{}); res != datapath.Attached {
		t.Fatalf("up after an interrupted down: %s, want %s", res, datapath.Attached)
	}
	if sockops, setsockopt := e.AttachedSockOps(), e.AttachedSetsockopt(); len(sockops) != 1 || len(setsockopt) != 1 {
		t.Errorf("attached after recovery: sock_ops %v, setsockopt %v; want one each", sockops, setsockopt)
	}
	if c := transferOn(t, e, "127.0.0.1:0", 13); c.BytesRedirected == 0 {
		t.Errorf("not accelerating after recovery: %+v", c)
	}
}

// up and down switch the guards' BPF trampolines on hooks that every
// read(2) and write(2) runs through, so the kernel patches that code while
// other CPUs are in it. A busy host must go on running through every
// round. (Under qemu with a TCG thread per vCPU, this killed the 6.12
// guest: docs/kernels.md.)
func TestUpDownWhileOtherCPUsReadAndWrite(t *testing.T) {
	e := harness.New(t)
	var stop atomic.Bool
	calls := make([]atomic.Int64, max(2, runtime.NumCPU()))
	var workers sync.WaitGroup
	for i := range calls {
		workers.Go(func() { readAndWriteUntil(t, &stop, &calls[i]) })
	}
	defer workers.Wait()
	defer stop.Store(true)

	for round := range 10 {
		before := make([]int64, len(calls))
		for i := range calls {
			before[i] = calls[i].Load()
		}
		if res := e.Up(datapath.Config{}); res != datapath.Attached {
			t.Fatalf("round %d: up: %s, want %s", round, res, datapath.Attached)
		}
		if wasUp, err := datapath.Down(datapath.DownOptions{PinDir: e.PinDir}); err != nil || !wasUp {
			t.Fatalf("round %d: down: %v (was up: %v)", round, err, wasUp)
		}
		for i := range calls {
			if calls[i].Load() == before[i] {
				t.Errorf("round %d: worker %d made no system call during up and down", round, i)
			}
		}
	}
}

// readAndWriteUntil copies /dev/zero to /dev/null a byte at a time, one
// read and one write per byte, counting them, until stop is set.
func readAndWriteUntil(t *testing.T, stop *atomic.Bool, calls *atomic.Int64) {
	zero, err := os.Open("/dev/zero")
	if err != nil {
		t.Error(err)
		return
	}
	defer zero.Close()
	null, err := os.OpenFile("/dev/null", os.O_WRONLY, 0)
	if err != nil {
		t.Error(err)
		return
	}
	defer null.Close()
	b := make([]byte, 1)
	for !stop.Load() {
		if _, err := zero.Read(b); err != nil {
			t.Error(err)
			return
		}
		if _, err := null.Write(b); err != nil {
			t.Error(err)
			return
		}
		calls.Add(2)
	}
}

// Two namespaces use the same loopback 4-tuple at the same time; each
// connection gets only its own bytes (the seeds differ).
func TestSameTupleInTwoNamespaces(t *testing.T) {
	e := harness.New(t)
	other, err := sandbox.NewNetns()
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	e.Up(datapath.Config{})
	a := harness.Transfer{Listen: "127.0.0.1:7777", ClientPort: 40001, Bytes: 16 << 20, Seed: 100}
	b := a
	b.Seed = 200
	agentA := e.Start(harness.Scenario{Transfer: &a}, time.Minute)
	agentB := e.StartIn(other, harness.Scenario{Transfer: &b}, time.Minute)
	var resA, resB harness.TransferResult
	if err := errors.Join(agentA.Wait(&resA), agentB.Wait(&resB)); err != nil {
		t.Fatal(err)
	}
	a.Check(t, &resA)
	b.Check(t, &resB)
	if c := e.Status().Counters; c.SocketsAdded != 4 || c.BytesRedirected != uint64(4*a.Bytes) {
		t.Errorf("want both connections accelerated, got %+v", c)
	}
}

// Many short connections: every socket leaves the map when it closes.
func TestChurn(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	for round := range 4 {
		tr := harness.Transfer{Listen: "127.0.0.1:0", Bytes: 4096, Seed: uint64(1000 * (round + 1)), Connections: 250,
			EagerClient: true, CheckFIONREAD: fionreadCountsRedirected(e)}
		var res harness.TransferResult
		e.Run(harness.Scenario{Transfer: &tr}, &res)
		tr.Check(t, &res)
	}
	st := e.Status()
	if c := st.Counters; !everyPairAddedOrDeclined(c, 1000) || st.Sockets != 0 {
		t.Errorf("after 1000 connections: %+v, %d sockets still in the map; want every pair added or declined, and none left",
			c, st.Sockets)
	}
}

// More than 4 GiB on one connection: nothing wraps (SOCKREDIR_TEST_LARGE_BYTES
// scales it down for the emulated kernels).
func TestLargeTransfer(t *testing.T) {
	n := envBytes(t, "SOCKREDIR_TEST_LARGE_BYTES", 4<<30+12345)
	e := harness.New(t)
	e.Up(datapath.Config{})
	tr := harness.Transfer{Listen: "127.0.0.1:0", Bytes: n, Seed: 14, OneWay: true}
	var res harness.TransferResult
	e.Run(harness.Scenario{Transfer: &tr}, &res)
	tr.Check(t, &res)
	if c := e.Status().Counters; c.BytesRedirected != uint64(n) {
		t.Errorf("redirected %d of %d bytes", c.BytesRedirected, n)
	}
}

// waitDetached waits for the kernel to release links whose last reference
// went (it may do so a moment later): the sock_ops one and, unless
// keepSetsockopt, the setsockopt one.
func waitDetached(t *testing.T, e *harness.Env, keepSetsockopt bool) {
	t.Helper()
	for range 50 {
		if len(e.AttachedSockOps()) == 0 && (keepSetsockopt || len(e.AttachedSetsockopt()) == 0) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("programs still attached: sock_ops %v, setsockopt %v", e.AttachedSockOps(), e.AttachedSetsockopt())
}

// A datapath pinned by a build with another map layout gets a clear
// answer, not a decoding error, from every command.
func TestOtherMapLayoutIsRefusedClearly(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	setPinnedABI := func(abi uint32) {
		m, err := ebpf.LoadPinnedMap(filepath.Join(e.PinDir, "meta"), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		var rec []byte
		if err := m.Lookup(uint32(0), &rec); err != nil {
			t.Fatal(err)
		}
		binary.NativeEndian.PutUint32(rec[8:], abi) // after the 8-byte magic
		if err := m.Put(uint32(0), rec); err != nil {
			t.Fatal(err)
		}
	}
	setPinnedABI(1)
	const want = "another map layout"
	if _, err := datapath.ReadStatus(e.PinDir); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("status: %v, want %q", err, want)
	}
	if _, err := datapath.Down(datapath.DownOptions{PinDir: e.PinDir}); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("down: %v, want %q", err, want)
	}
	var up error
	e.Do(func() error {
		_, up = datapath.Up(datapath.Config{Cgroup: e.Cgroup, PinDir: e.PinDir})
		return nil
	})
	if up == nil || !strings.Contains(up.Error(), want) {
		t.Errorf("up: %v, want %q", up, want)
	}
	setPinnedABI(datapath.ABIVersion)
}

// `down` while a splice reader's peer goes on sending. Where the splice
// guard loads, the reader falls back to read(2) and gets everything. Where
// it can't, the peer redirects to the reader after `down` too, rather than
// send over TCP past the bytes waiting for it (a hole), and down leaves that
// pair in the map and says so: the reader gets a prefix of the stream.
func TestDownWithASpliceReader(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	guarded := e.Status().SpliceGuard
	const size = 64 << 10
	agent := e.Start(harness.Scenario{Case: &harness.Case{Name: "splice-reader-during-down", Bytes: size}}, time.Minute)
	// Its peer sends for 3 s more: down once the reader splices (where
	// the guard loads, its splice fails and it reads, recorded as nothing).
	time.Sleep(500 * time.Millisecond)
	for deadline := time.Now().Add(10 * time.Second); !guarded && e.Status().Counters.InboundRefused == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the splice watch never recorded the reader's splice")
		}
	}
	_, downErr := datapath.Down(datapath.DownOptions{PinDir: e.PinDir, DrainTimeout: time.Second})
	var r harness.CaseResult
	if err := agent.Wait(&r); err != nil {
		t.Fatal(err)
	}
	received, total := r.Values["received"], int64(size+32*(size/8))
	switch {
	case r.Values["prefix_matches"] != 1:
		t.Errorf("the splice reader read %d bytes with a hole in them", received)
	case guarded && (received != total || len(r.Errors) != 0):
		t.Errorf("the reader read %d of %d bytes (errors %v), want all of them", received, total, r.Errors)
	case !guarded && !errors.Is(downErr, datapath.ErrUnreadData):
		t.Errorf("down: %v, want %v for the splice reader's pair", downErr, datapath.ErrUnreadData)
	}
}
