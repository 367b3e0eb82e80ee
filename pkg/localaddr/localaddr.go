// Package localaddr finds the IP addresses that count as local for the
// datapath: those of this process's network namespace and of every network
// namespace that a process of the attached cgroup is in (pods on one node
// each have their own). The datapath accelerates a connection only when its
// other end has one of these addresses.
package localaddr

import (
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// List returns the addresses of every interface in the current network
// namespace, IPv4 and IPv6, without duplicates.
func List() ([]netip.Addr, error) {
	addrs, err := listAddrs(netlink.AddrList)
	if err != nil {
		return nil, fmt.Errorf("listing local addresses: %w", err)
	}
	return unique(addrs), nil
}

// ListIn returns the addresses of every interface in network namespace ns.
func ListIn(ns netns.NsHandle) ([]netip.Addr, error) {
	// Routing only: the other netlink families may be modules that are
	// not loaded, and opening them would fail.
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("opening netlink in a network namespace: %w", err)
	}
	defer h.Close()
	addrs, err := listAddrs(h.AddrList)
	if err != nil {
		return nil, fmt.Errorf("listing the addresses of a network namespace: %w", err)
	}
	return unique(addrs), nil
}

// dumpAttempts is how often listAddrs asks again while addresses change.
const dumpAttempts = 5

// listAddrs lists every address, IPv4 and IPv6, with list (a netlink
// handle's AddrList). The kernel flags a listing that spans several
// messages as interrupted when an address changed meanwhile (pods come and
// go while the daemon starts); such a listing may miss or repeat entries,
// so it is asked for again.
func listAddrs(list func(netlink.Link, int) ([]netlink.Addr, error)) ([]netlink.Addr, error) {
	for attempt := 1; ; attempt++ {
		addrs, err := list(nil, netlink.FAMILY_ALL)
		if !errors.Is(err, netlink.ErrDumpInterrupted) || attempt == dumpAttempts {
			return addrs, err
		}
	}
}

// OfCgroup returns the addresses of this process's network namespace and of
// every namespace a process of cgroup (or below it) is in.
func OfCgroup(cgroup string) ([]netip.Addr, error) {
	namespaces, err := CgroupNamespaces(cgroup)
	if err != nil {
		return nil, err
	}
	defer closeAll(namespaces)
	var all []netip.Addr
	for _, ns := range namespaces {
		addrs, err := ListIn(ns)
		if err != nil {
			return nil, err
		}
		all = append(all, addrs...)
	}
	slices.SortFunc(all, netip.Addr.Compare)
	return slices.Compact(all), nil
}

// CgroupNamespaces returns this process's network namespace (that of the
// calling thread) and those of the processes in cgroup and below it, each
// once. The caller closes them.
func CgroupNamespaces(cgroup string) ([]netns.NsHandle, error) {
	n, err := OpenNamespaces(cgroup)
	if err != nil {
		return nil, err
	}
	return n.Handles(), nil
}

// Namespaces follows the network namespaces of a cgroup's processes, and
// this process's own, with one handle open for each.
type Namespaces struct {
	cgroup   string
	own      nsID
	handles  map[nsID]netns.NsHandle
	pids     map[int]nsID // the cgroup's processes at the last Refresh
	restated time.Time    // when every process's namespace was last looked up
}

// restatEvery is how often Refresh looks up the namespace of every process,
// not only of new ones: a process may move to another namespace after it
// joined the cgroup (unshare -n, ip netns exec).
const restatEvery = time.Second

// OpenNamespaces opens this process's network namespace (that of the
// calling thread) and those the processes in cgroup and below it are in.
func OpenNamespaces(cgroup string) (*Namespaces, error) {
	own, err := OwnNamespace()
	if err != nil {
		return nil, err
	}
	id, err := idOf(own)
	if err != nil {
		own.Close()
		return nil, fmt.Errorf("identifying this process's network namespace: %w", err)
	}
	n := &Namespaces{cgroup: cgroup, own: id, handles: map[nsID]netns.NsHandle{id: own}, pids: map[int]nsID{}}
	if err := n.Refresh(); err != nil {
		n.Close()
		return nil, err
	}
	return n, nil
}

// Refresh lists the cgroup's processes again: it opens the namespaces of
// those that came and closes the namespaces that no process is in any more.
// Only a process it has not seen before costs more than reading cgroup.procs
// (except once every restatEvery, when it looks up every process again), so
// it is cheap enough to call at every check of the datapath.
func (n *Namespaces) Refresh() error {
	known := n.pids
	if time.Since(n.restated) >= restatEvery {
		known, n.restated = nil, time.Now()
	}
	pids := map[int]nsID{}
	err := filepath.WalkDir(n.cgroup, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil // cgroups come and go while we walk
		}
		procs, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
		if err != nil {
			return nil
		}
		for _, field := range strings.Fields(string(procs)) {
			pid, err := strconv.Atoi(field)
			if err != nil {
				continue
			}
			if id, seen := known[pid]; seen {
				pids[pid] = id
			} else if id, ok := n.open(pid); ok {
				pids[pid] = id
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	n.pids = pids
	inUse := map[nsID]bool{n.own: true}
	for _, id := range pids {
		inUse[id] = true
	}
	for id, ns := range n.handles {
		if !inUse[id] {
			ns.Close()
			delete(n.handles, id)
		}
	}
	return nil
}

// open makes sure the namespace of process pid is open, and returns its id;
// false if the process has exited.
func (n *Namespaces) open(pid int) (nsID, bool) {
	// A stat is cheaper than opening the namespace of each of the many
	// processes that share one.
	id, err := pidNamespaceID(pid)
	if err != nil {
		return nsID{}, false
	}
	if _, known := n.handles[id]; known {
		return id, true
	}
	ns, err := netns.GetFromPid(pid)
	if err != nil {
		return nsID{}, false
	}
	if opened, err := idOf(ns); err != nil || opened != id {
		ns.Close() // the pid was reused in between
		return nsID{}, false
	}
	n.handles[id] = ns
	return id, true
}

// Handles returns one handle for each namespace, this process's first; they
// stay open until the namespace is left or n is closed.
func (n *Namespaces) Handles() []netns.NsHandle {
	handles := []netns.NsHandle{n.handles[n.own]}
	for id, ns := range n.handles {
		if id != n.own {
			handles = append(handles, ns)
		}
	}
	return handles
}

// Close closes every handle.
func (n *Namespaces) Close() {
	for _, ns := range n.handles {
		ns.Close()
	}
	n.handles = nil
}

// OwnNamespace opens the network namespace of the calling thread, which is
// this process's: threads that enter another namespace are locked to their
// goroutine and exit with it. The goroutine stays on its thread while the
// namespace is opened by thread id; otherwise it could move, and its old
// thread exit, in between, and the open fail with ENOENT.
func OwnNamespace() (netns.NsHandle, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	own, err := netns.Get()
	if err != nil {
		return netns.None(), fmt.Errorf("opening this process's network namespace: %w", err)
	}
	return own, nil
}

// nsID tells network namespaces apart: the device and inode of their nsfs file.
type nsID struct{ dev, ino uint64 }

func pidNamespaceID(pid int) (nsID, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st); err != nil {
		return nsID{}, err
	}
	return nsID{st.Dev, st.Ino}, nil
}

func idOf(ns netns.NsHandle) (nsID, error) {
	var st syscall.Stat_t
	if err := syscall.Fstat(int(ns), &st); err != nil {
		return nsID{}, err
	}
	return nsID{st.Dev, st.Ino}, nil
}

func closeAll(handles []netns.NsHandle) {
	for _, h := range handles {
		h.Close()
	}
}

// unique returns the addresses as plain (not IPv4-mapped) netip.Addrs, each once.
func unique(addrs []netlink.Addr) []netip.Addr {
	seen := make(map[netip.Addr]bool, len(addrs))
	var out []netip.Addr
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if !seen[ip] {
			seen[ip] = true
			out = append(out, ip)
		}
	}
	return out
}
