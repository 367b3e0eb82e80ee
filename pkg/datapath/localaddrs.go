package datapath

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// SetLocalAddrs makes the local_addrs map of the datapath pinned in pinDir
// hold exactly addrs: the addresses whose connections may be accelerated.
// The daemon calls it whenever addresses come or go.
func SetLocalAddrs(pinDir string, addrs []netip.Addr) error {
	p := pins(pinDir)
	if !p.has("local_addrs") {
		return fmt.Errorf("%w: run `sockredir up --pin-dir %s` first", notUp(pinDir), pinDir)
	}
	m, err := ebpf.LoadPinnedMap(p.path("local_addrs"), nil)
	if err != nil {
		return fmt.Errorf("opening the pinned local address map: %w", err)
	}
	defer m.Close()
	return replaceLocalAddrs(m, addrs)
}

// ErrLocalAddrsFull says that some local addresses were left out of a full
// map: connections to them aren't accelerated, and nothing else happens.
var ErrLocalAddrsFull = errors.New("the local address map is full")

// replaceLocalAddrs makes m hold exactly addrs, or as many as fit: the
// lowest ones, so that the same addresses always make it. Stale addresses go
// out first, so that a full map makes room for new ones: an address missing
// meanwhile only costs acceleration. Addresses already held are not written
// again: the daemon calls this at every rescan, with thousands of addresses
// on some hosts.
func replaceLocalAddrs(m *ebpf.Map, addrs []netip.Addr) error {
	missing := make(map[[16]byte]bool, len(addrs))
	for _, a := range addrs {
		missing[a.As16()] = true // IPv4 in IPv4-mapped form, as the BPF side keys it
	}
	total := len(missing)
	held, err := heldKeys(m)
	if err != nil {
		return fmt.Errorf("updating the local addresses: %w", err)
	}
	var stale [][16]byte
	for _, k := range held {
		if missing[k] {
			delete(missing, k)
		} else {
			stale = append(stale, k)
		}
	}
	if err := deleteKeys(m, stale); err != nil {
		return fmt.Errorf("updating the local addresses: %w", err)
	}
	left := 0
	for _, k := range slices.SortedFunc(maps.Keys(missing), func(a, b [16]byte) int { return bytes.Compare(a[:], b[:]) }) {
		switch err := m.Put(k, uint8(1)); {
		case errors.Is(err, unix.E2BIG): // the map is full
			left++
		case err != nil:
			return fmt.Errorf("updating the local addresses: %w", err)
		}
	}
	if left > 0 {
		return fmt.Errorf("%w: %d of the cgroup's %d local addresses don't fit in its %d entries, "+
			"and connections to them go over TCP", ErrLocalAddrsFull, left, total, m.MaxEntries())
	}
	return nil
}

// heldKeys lists m's keys, one system call each, since their values need
// no lookup. A NextKey walk can start over if a key is deleted under it;
// only this package writes the map, and not during the walk.
func heldKeys(m *ebpf.Map) ([][16]byte, error) {
	var (
		keys [][16]byte
		key  [16]byte
		prev any // nil: from the first key
	)
	for {
		switch err := m.NextKey(prev, &key); {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return keys, nil
		case err != nil:
			return nil, err
		}
		keys = append(keys, key)
		prev = key
	}
}
