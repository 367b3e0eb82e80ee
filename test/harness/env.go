// Package harness runs sockredir's privileged end-to-end tests: each test gets
// a cgroup, a pin directory and a network namespace of its own, and removes
// all three afterwards, also when it fails. The applications under test are
// agents: this test binary started again, inside the cgroup and namespace.
package harness

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/policy"
	"github.com/sockredir/sockredir/pkg/sandbox"
	"github.com/sockredir/sockredir/test/testenv"
)

// Env is one test's cgroup, pin directory and network namespace.
type Env struct {
	T      testing.TB
	Cgroup string
	PinDir string
	NS     *sandbox.Netns
	// Probation keeps sockredir's default of holding a server port's
	// first connections on TCP. Tests that aren't about it leave it off:
	// each of their servers is new, and they check what happens to its
	// first connection once accelerated.
	Probation bool
	cgroup    *sandbox.Cgroup
}

// RequirePrivileges skips a test that can't load BPF, except in CI
// (CI=true), where such a test must fail: the privileged tests are the point.
func RequirePrivileges(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t, "to load BPF programs")
}

// New makes a cgroup, a pin directory name and a network namespace with
// loopback up, and registers their removal.
func New(t testing.TB) *Env {
	t.Helper()
	RequirePrivileges(t)
	cg, err := sandbox.NewCgroup("sockredir-test-")
	if err != nil {
		t.Fatal(err)
	}
	e := &Env{T: t, Cgroup: cg.Path, PinDir: "/sys/fs/bpf/" + filepath.Base(cg.Path), cgroup: cg}
	t.Cleanup(func() {
		if err := cg.Remove(5 * time.Second); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	t.Cleanup(e.down)
	if e.NS, err = sandbox.NewNetns(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.NS.Close() })
	return e
}

// Do runs fn on a thread inside the test's network namespace; a process it
// starts is in that namespace too. A failure fails the test.
func (e *Env) Do(fn func() error) {
	e.T.Helper()
	if err := e.NS.Do(fn); err != nil {
		e.T.Fatal(err)
	}
}

// Up attaches sockredir to the test's cgroup and pin directory with cfg's
// other settings, from inside the test's namespace so that its addresses
// count as local.
func (e *Env) Up(cfg datapath.Config) datapath.UpResult {
	e.T.Helper()
	cfg.Cgroup, cfg.PinDir = e.Cgroup, e.PinDir
	if !e.Probation {
		p := policy.Policy{}
		if cfg.Policy != nil {
			p = *cfg.Policy
		}
		p.Redirect.AccelerateNewPorts = true
		cfg.Policy = &p
	}
	var res datapath.UpResult
	e.Do(func() (err error) {
		res, err = datapath.Up(cfg)
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

// AttachedSockOps lists the sock_ops programs attached to the test's cgroup.
func (e *Env) AttachedSockOps() []ebpf.ProgramID {
	return e.attached(ebpf.AttachCGroupSockOps)
}

// AttachedSetsockopt lists the setsockopt programs attached to the test's
// cgroup.
func (e *Env) AttachedSetsockopt() []ebpf.ProgramID {
	return e.attached(ebpf.AttachCGroupSetsockopt)
}

func (e *Env) attached(attach ebpf.AttachType) []ebpf.ProgramID {
	e.T.Helper()
	f, err := os.Open(e.Cgroup)
	if err != nil {
		e.T.Fatal(err)
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: attach})
	if err != nil {
		e.T.Fatalf("querying the cgroup's programs: %v", err)
	}
	var ids []ebpf.ProgramID
	for _, p := range res.Programs {
		ids = append(ids, p.ID)
	}
	return ids
}
