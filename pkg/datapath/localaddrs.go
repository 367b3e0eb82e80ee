package datapath

import (
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
)

// SetLocalAddrs makes the local_addrs map of the datapath pinned in pinDir
// hold exactly addrs: the addresses whose connections may be accelerated.
// The daemon calls it whenever addresses come or go.
func SetLocalAddrs(pinDir string, addrs []netip.Addr) error {
	p := pins(pinDir)
	if !p.has("local_addrs") {
		return fmt.Errorf("sockredir is not up in %s: run `sockredir up --pin-dir %s` first", pinDir, pinDir)
	}
	m, err := ebpf.LoadPinnedMap(p.path("local_addrs"), nil)
	if err != nil {
		return fmt.Errorf("opening the pinned local address map: %w", err)
	}
	defer m.Close()
	return replaceLocalAddrs(m, addrs)
}

// replaceLocalAddrs makes m hold exactly addrs.
func replaceLocalAddrs(m *ebpf.Map, addrs []netip.Addr) error {
	want := make(map[[16]byte]uint8, len(addrs))
	for _, a := range addrs {
		want[a.As16()] = 1 // IPv4 in IPv4-mapped form, as the BPF side keys it
	}
	if err := replaceContents(m, want); err != nil {
		return fmt.Errorf("updating the local addresses: %w", err)
	}
	return nil
}
