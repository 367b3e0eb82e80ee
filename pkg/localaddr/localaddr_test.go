package localaddr

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sockredir/sockredir/pkg/sandbox"
	"github.com/sockredir/sockredir/test/testenv"
	"github.com/vishvananda/netlink"
)

func TestListHasLoopback(t *testing.T) {
	addrs, err := List()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(addrs, netip.MustParseAddr("127.0.0.1")) {
		t.Fatalf("127.0.0.1 missing from %v", addrs)
	}
	for _, a := range addrs {
		if a.Is4In6() {
			t.Errorf("%v is IPv4-mapped: List must return plain IPv4", a)
		}
	}
}

// Namespaces opens the namespace of a process that joins the cgroup at the
// next Refresh, and closes it once no process of the cgroup is in it. The
// "cgroup" is a directory with a cgroup.procs file: Namespaces only reads it.
func TestNamespacesFollowTheCgroup(t *testing.T) {
	testenv.RequireRoot(t, "for network namespaces")
	pod, err := sandbox.NewNetns()
	if err != nil {
		t.Fatal(err)
	}
	defer pod.Close()
	podID, err := idOf(pod.Handle())
	if err != nil {
		t.Fatal(err)
	}
	cgroup := t.TempDir()
	setProcs := func(pids ...int) {
		t.Helper()
		var list strings.Builder
		for _, pid := range pids {
			fmt.Fprintln(&list, pid)
		}
		if err := os.WriteFile(filepath.Join(cgroup, "cgroup.procs"), []byte(list.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	opened := func(n *Namespaces) []nsID {
		var ids []nsID
		for _, ns := range n.Handles() {
			id, err := idOf(ns)
			if err != nil {
				t.Fatalf("a handle that Namespaces gave is not open: %v", err)
			}
			ids = append(ids, id)
		}
		return ids
	}

	setProcs()
	n, err := OpenNamespaces(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if ids := opened(n); len(ids) != 1 || ids[0] == podID {
		t.Fatalf("namespaces %v of an empty cgroup, want only this process's", ids)
	}

	sleeper := exec.Command("sleep", "60")
	if err := pod.Do(sleeper.Start); err != nil {
		t.Fatal(err)
	}
	defer func() { sleeper.Process.Kill(); sleeper.Wait() }()
	setProcs(sleeper.Process.Pid)
	if err := n.Refresh(); err != nil {
		t.Fatal(err)
	}
	if ids := opened(n); len(ids) != 2 || ids[1] != podID {
		t.Fatalf("namespaces %v, want this process's and then the pod's %v", ids, podID)
	}

	setProcs()
	if err := n.Refresh(); err != nil {
		t.Fatal(err)
	}
	if ids := opened(n); len(ids) != 1 || ids[0] == podID {
		t.Fatalf("namespaces %v after the pod's process left, want only this process's", ids)
	}
}

// A process that enters a namespace of its own after joining the cgroup
// (unshare -n, ip netns exec) is followed there within restatEvery.
func TestNamespacesFollowAProcessThatMoves(t *testing.T) {
	testenv.RequireRoot(t, "for network namespaces")
	cgroup := t.TempDir()
	mover := exec.Command("sh", "-c", "read go; exec unshare -n sleep 60")
	start, err := mover.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := mover.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { mover.Process.Kill(); mover.Wait() }()
	pid := mover.Process.Pid
	if err := os.WriteFile(filepath.Join(cgroup, "cgroup.procs"), []byte(fmt.Sprintln(pid)), 0o644); err != nil {
		t.Fatal(err)
	}
	before, err := pidNamespaceID(pid)
	if err != nil {
		t.Fatal(err)
	}
	n, err := OpenNamespaces(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()

	fmt.Fprintln(start, "go")
	deadline := time.Now().Add(10 * time.Second)
	for {
		if now, err := pidNamespaceID(pid); err == nil && now != before {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the process did not enter a namespace of its own")
		}
		time.Sleep(10 * time.Millisecond)
	}
	moved, err := pidNamespaceID(pid)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(restatEvery)
	if err := n.Refresh(); err != nil {
		t.Fatal(err)
	}
	var ids []nsID
	for _, ns := range n.Handles() {
		id, err := idOf(ns)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if len(ids) != 2 || ids[1] != moved {
		t.Errorf("namespaces %v, want this process's and %v, the one the process moved to", ids, moved)
	}
}

// The daemon's iterator throws away a thread for each namespace it enters,
// so OwnNamespace runs while threads exit; it must never open the namespace
// of a thread that is gone (seen in CI: the daemon stopped with ENOENT).
func TestOwnNamespaceWhileThreadsExit(t *testing.T) {
	want, err := OwnNamespace()
	if err != nil {
		t.Fatal(err)
	}
	defer want.Close()
	stop := make(chan struct{})
	var exiting sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		exiting.Add(1)
		go func() {
			defer exiting.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				ended := make(chan struct{})
				go func() {
					runtime.LockOSThread() // never unlocked: the thread exits
					close(ended)
				}()
				<-ended
			}
		}()
	}
	defer func() { close(stop); exiting.Wait() }()
	for i := range 20000 {
		own, err := OwnNamespace()
		if err != nil {
			t.Fatalf("open %d: %v", i, err)
		}
		same := own.Equal(want)
		own.Close()
		if !same {
			t.Fatalf("open %d: another namespace than this process's", i)
		}
		runtime.Gosched()
	}
}

// A listing that addresses changed under is asked for again, a few times.
func TestListAddrsRetriesInterruptedDumps(t *testing.T) {
	whole := []netlink.Addr{{IPNet: &net.IPNet{IP: net.IPv4(10, 0, 0, 1), Mask: net.CIDRMask(8, 32)}}}
	for _, tc := range []struct {
		interrupted, wantCalls int
		wantErr                bool
	}{
		{interrupted: 0, wantCalls: 1},
		{interrupted: 2, wantCalls: 3},
		{interrupted: 100, wantCalls: dumpAttempts, wantErr: true},
	} {
		calls := 0
		addrs, err := listAddrs(func(netlink.Link, int) ([]netlink.Addr, error) {
			calls++
			if calls <= tc.interrupted {
				return whole[:0], netlink.ErrDumpInterrupted
			}
			return whole, nil
		})
		if calls != tc.wantCalls {
			t.Errorf("%d interrupted dumps: %d listings, want %d", tc.interrupted, calls, tc.wantCalls)
		}
		if tc.wantErr != (err != nil) || (!tc.wantErr && len(addrs) != 1) {
			t.Errorf("%d interrupted dumps: got %v, %v", tc.interrupted, addrs, err)
		}
	}
}
