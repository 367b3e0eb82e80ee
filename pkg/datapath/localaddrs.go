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
// meanwhile only costs acceleration.
func replaceLocalAddrs(m *ebpf.Map, addrs []netip.Addr) error {
	want := make(map[[16]byte]uint8, len(addrs))
	for _, a := range addrs {
		want[a.As16()] = 1 // IPv4 in IPv4-mapped form, as the BPF side keys it
	}
	if err := deleteStale(m, want); err != nil {
		return fmt.Errorf("updating the local addresses: %w", err)
	}
	left := 0
	for _, k := range slices.SortedFunc(maps.Keys(want), func(a, b [16]byte) int { return bytes.Compare(a[:], b[:]) }) {
		switch err := m.Put(k, want[k]); {
		case errors.Is(err, unix.E2BIG): // the map is full
			left++
		case err != nil:
			return fmt.Errorf("updating the local addresses: %w", err)
		}
	}
	if left > 0 {
		return fmt.Errorf("%w: %d of the cgroup's %d local addresses don't fit in its %d entries, "+
			"and connections to them go over TCP", ErrLocalAddrsFull, left, len(want), m.MaxEntries())
	}
	return nil
}
