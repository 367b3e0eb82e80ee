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
	Sockets int
	// ProbationSockets is how many sockets of probation connections are
	// open now: on TCP, watched until they close.
	ProbationSockets int
	Counters         Counters
}

// ErrNotUp says that nothing is pinned in the pin directory.
var ErrNotUp = errors.New("sockredir is not up")

func notUp(pinDir string) error { return fmt.Errorf("%w in %s", ErrNotUp, pinDir) }

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
		return Usage{}, notUp(pinDir)
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
		var key sockopsSockKey
		var cookie uint64
		if u.Sockets, err = countEntries(m, &key, &cookie); err != nil {
			return u, err
		}
	}
	if u.ProbationSockets, err = countProbationSockets(maps); err != nil {
		return u, err
	}
	return u, nil
}

// countProbationSockets counts probation_sockets' entries.
func countProbationSockets(maps map[string]*ebpf.Map) (int, error) {
	m := maps["probation_sockets"]
	if m == nil {
		return 0, nil
	}
	var cookie uint64
	var port sockopsPortKey
	return countEntries(m, &cookie, &port)
}

// countEntries counts m's entries, read into key and value.
func countEntries(m *ebpf.Map, key, value any) (int, error) {
	n := 0
	it := m.Iterate()
	for it.Next(key, value) {
		n++
	}
	if err := it.Err(); err != nil {
		return n, fmt.Errorf("counting the entries of %s: %w", m, err)
	}
	return n, nil
}
