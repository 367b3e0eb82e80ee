package datapath

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// Usage is the part of Status that is cheap to read: only the pinned maps,
// without ReadStatus's kernel probe and socket inspector, which load
// programs and open connections. Metrics read it on every scrape.
type Usage struct {
	// Up says whether sock_ops is attached to the cgroup.
	Up bool
	// MapSize is how many sockets sock_hash holds at most.
	MapSize uint32
	// Sockets is how many sockets sock_hash holds now.
	Sockets  int
	Counters Counters
}

// ErrNotUp says that nothing is pinned in the pin directory.
var ErrNotUp = errors.New("sockredir is not up")

// ReadUsage reads the datapath pinned in pinDir (DefaultPinDir if empty),
// or returns ErrNotUp.
func ReadUsage(pinDir string) (Usage, error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	p := pins(pinDir)
	meta, err := p.meta()
	if err != nil {
		return Usage{}, err
	}
	if meta == nil {
		return Usage{}, fmt.Errorf("%w in %s", ErrNotUp, pinDir)
	}
	if err := meta.checkABI(pinDir); err != nil {
		return Usage{}, err
	}
	u := Usage{Up: p.has(pinLink), MapSize: meta.MapSize}
	maps, err := p.loadMaps()
	if err != nil {
		return u, err
	}
	defer closeMaps(maps)
	if m := maps["counters"]; m != nil {
		if u.Counters, err = readCounters(m); err != nil {
			return u, err
		}
	}
	if m := maps["sock_hash"]; m != nil {
		if u.Sockets, err = countEntries(m); err != nil {
			return u, err
		}
	}
	return u, nil
}

// countEntries counts sock_hash's entries.
func countEntries(m *ebpf.Map) (int, error) {
	var (
		key    sockopsSockKey
		cookie uint64
		n      int
	)
	it := m.Iterate()
	for it.Next(&key, &cookie) {
		n++
	}
	if err := it.Err(); err != nil {
		return n, fmt.Errorf("counting the sockets in the map: %w", err)
	}
	return n, nil
}
