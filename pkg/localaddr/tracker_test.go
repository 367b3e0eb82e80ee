package localaddr

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/sandbox"
	"github.com/sockredir/sockredir/test/testenv"
)

func TestDifference(t *testing.T) {
	a := []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("::1")}
	b := []netip.Addr{netip.MustParseAddr("10.0.0.2")}
	if got := difference(a, b); !slices.Equal(got, []netip.Addr{a[0], a[2]}) {
		t.Errorf("difference: %v", got)
	}
	if got := difference(b, a); got != nil {
		t.Errorf("difference: %v, want none", got)
	}
}

// addVeth adds a veth pair to ns with cidr on its first end.
func addVeth(t *testing.T, ns *sandbox.Netns, name, cidr string) {
	t.Helper()
	err := ns.Do(func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		addr, err := netlink.ParseAddr(cidr)
		if err != nil {
			return err
		}
		addr.Flags = unix.IFA_F_NODAD
		return netlink.AddrAdd(veth, addr)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func delLink(t *testing.T, ns *sandbox.Netns, name string) {
	t.Helper()
	err := ns.Do(func() error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// The tracker follows addresses in its own namespace and in those of the
// cgroup's processes, and forgets a namespace when no process is left in
// it. The "cgroup" is a directory with a cgroup.procs file: the tracker
// only reads it.
func TestTracker(t *testing.T) {
	testenv.RequireRoot(t, "for network namespaces")
	own, err := sandbox.NewNetns()
	if err != nil {
		t.Fatal(err)
	}
	defer own.Close()
	pod, err := sandbox.NewNetns()
	if err != nil {
		t.Fatal(err)
	}
	defer pod.Close()
	cgroup := t.TempDir()
	procs := filepath.Join(cgroup, "cgroup.procs")

	// A process in the pod namespace, listed in the cgroup.
	sleeper := exec.Command("sleep", "60")
	if err := pod.Do(sleeper.Start); err != nil {
		t.Fatal(err)
	}
	defer func() { sleeper.Process.Kill(); sleeper.Wait() }()
	if err := os.WriteFile(procs, []byte(strconv.Itoa(sleeper.Process.Pid)+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	addVeth(t, own, "own0", "10.91.0.1/24")
	addVeth(t, pod, "pod0", "10.92.0.1/24")

	sets := make(chan []netip.Addr, 100)
	tr := NewTracker(cgroup, 50*time.Millisecond, func(addrs []netip.Addr) error {
		select {
		case sets <- addrs:
		default: // the same set comes again at the next rescan
		}
		return nil
	}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- own.Do(func() error { return tr.Run(ctx) }) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()

	// waitFor waits for a set for which cond holds.
	waitFor := func(what string, cond func([]netip.Addr) bool) {
		t.Helper()
		timeout := time.After(10 * time.Second)
		for {
			select {
			case s := <-sets:
				if cond(s) {
					return
				}
			case <-timeout:
				t.Fatalf("no address set with %s", what)
			}
		}
	}
	has := func(addr string) func([]netip.Addr) bool {
		return func(s []netip.Addr) bool { return slices.Contains(s, netip.MustParseAddr(addr)) }
	}
	not := func(f func([]netip.Addr) bool) func([]netip.Addr) bool {
		return func(s []netip.Addr) bool { return !f(s) }
	}
	both := func(f, g func([]netip.Addr) bool) func([]netip.Addr) bool {
		return func(s []netip.Addr) bool { return f(s) && g(s) }
	}

	waitFor("both namespaces' addresses", both(has("10.91.0.1"), has("10.92.0.1")))
	if tr.Namespaces() != 2 {
		t.Errorf("following %d namespaces, want 2", tr.Namespaces())
	}
	addVeth(t, pod, "pod1", "10.92.1.1/24")
	waitFor("an address added in the pod", has("10.92.1.1"))
	delLink(t, pod, "pod1")
	waitFor("the pod's address removed", not(has("10.92.1.1")))
	delLink(t, own, "own0")
	waitFor("its own address removed", not(has("10.91.0.1")))

	// Unchanged, the set is handed over again at every rescan, which
	// corrects what else wrote it meanwhile (an `up`).
	for len(sets) > 0 {
		<-sets
	}
	waitFor("the unchanged set, again", both(has("10.92.0.1"), not(has("10.91.0.1"))))

	// The pod's last process leaves the cgroup.
	if err := os.WriteFile(procs, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor("the pod's namespace forgotten", not(has("10.92.0.1")))
	if tr.Namespaces() != 1 {
		t.Errorf("following %d namespaces, want 1", tr.Namespaces())
	}
}
