// Package harness runs sockredir's privileged end-to-end tests: each test gets
// a cgroup, a pin directory and a network namespace of its own, and removes
// all three afterwards, also when it fails. The applications under test are
// agents: this test binary started again, inside the cgroup and namespace.
package harness

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/hostfs"
)

// Env is one test's cgroup, pin directory and network namespace.
type Env struct {
	T      testing.TB
	Cgroup string
	PinDir string
	NS     netns.NsHandle
}

// RequirePrivileges skips a test that can't load BPF, except in CI
// (CI=true), where such a test must fail: the privileged tests are the point.
func RequirePrivileges(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("the end-to-end tests need root, and CI=true: run them as root")
	}
	t.Skip("needs root to load BPF programs (set CI=true to make this a failure)")
}

// New makes a cgroup, a pin directory name and a network namespace with
// loopback up, and registers their removal.
func New(t testing.TB) *Env {
	t.Helper()
	RequirePrivileges(t)
	root, err := hostfs.CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	id := randomID()
	e := &Env{T: t, Cgroup: filepath.Join(root, "sockredir-test-"+id), PinDir: "/sys/fs/bpf/sockredir-test-" + id}
	if err := os.Mkdir(e.Cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.removeCgroup)
	t.Cleanup(e.down)

	e.NS, err = newNetns()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.NS.Close() })
	e.Do(func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	return e
}

func randomID() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// newNetns creates a network namespace, leaving the caller's thread alone.
func newNetns() (netns.NsHandle, error) {
	type result struct {
		ns  netns.NsHandle
		err error
	}
	done := make(chan result)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		ns, err := netns.New()
		done <- result{ns, err}
	}()
	r := <-done
	return r.ns, r.err
}

// Do runs fn on a thread inside the test's network namespace; a process it
// starts is in that namespace too. A failure fails the test.
func (e *Env) Do(fn func() error) {
	e.T.Helper()
	if err := e.do(fn); err != nil {
		e.T.Fatal(err)
	}
}

func (e *Env) do(fn func() error) error {
	done := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := netns.Set(e.NS); err != nil {
			done <- err
			return
		}
		done <- fn()
	}()
	return <-done
}

// Up attaches sockredir to the test's cgroup, from inside the test's
// namespace so that its addresses count as local.
func (e *Env) Up(mapSize uint32) datapath.UpResult {
	e.T.Helper()
	var res datapath.UpResult
	e.Do(func() (err error) {
		res, err = datapath.Up(datapath.Config{Cgroup: e.Cgroup, PinDir: e.PinDir, MapSize: mapSize})
		return err
	})
	return res
}

// Status reads the datapath's status, failing the test on error.
func (e *Env) Status() datapath.Status {
	e.T.Helper()
	st, err := datapath.ReadStatus(e.PinDir)
	if err != nil {
		e.T.Fatal(err)
	}
	return st
}

// down detaches whatever a test left attached.
func (e *Env) down() {
	if _, err := os.Stat(e.PinDir); err != nil {
		return
	}
	if _, err := datapath.Down(datapath.DownOptions{PinDir: e.PinDir, DrainTimeout: 10 * time.Second}); err != nil {
		e.T.Errorf("cleanup: down: %v", err)
	}
}

// removeCgroup removes the cgroup once the agents in it have gone.
func (e *Env) removeCgroup() {
	var err error
	for range 50 {
		if err = os.Remove(e.Cgroup); err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.T.Errorf("cleanup: removing cgroup %s: %v", e.Cgroup, err)
}

// AttachedSockOps lists the sock_ops programs attached to the test's cgroup.
func (e *Env) AttachedSockOps() []ebpf.ProgramID {
	e.T.Helper()
	f, err := os.Open(e.Cgroup)
	if err != nil {
		e.T.Fatal(err)
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachCGroupSockOps})
	if err != nil {
		e.T.Fatalf("querying the cgroup's programs: %v", err)
	}
	var ids []ebpf.ProgramID
	for _, p := range res.Programs {
		ids = append(ids, p.ID)
	}
	return ids
}

// cgroupFD opens the test's cgroup, for starting processes inside it.
func (e *Env) cgroupFD() (int, error) {
	fd, err := unix.Open(e.Cgroup, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("opening cgroup %s: %w", e.Cgroup, err)
	}
	return fd, nil
}
