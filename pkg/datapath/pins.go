package datapath

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// DefaultPinDir is where pins go unless told otherwise.
const DefaultPinDir = "/sys/fs/bpf/sockredir"

// Names of the pins, besides one per map (named as in bpf/sockredir.h).
const (
	pinLink         = "link_sockops"
	pinSockoptLink  = "link_setsockopt"
	pinGuardLink    = "link_splice_guard"
	pinFIONREADLink = "link_fionread_guard"
	// The splice watch, where the splice guard can't be attached.
	pinSpliceWatchLink        = "link_splice_watch"
	pinSendfileWatchLink      = "link_sendfile_watch"
	pinIoUringSpliceWatchLink = "link_io_uring_splice_watch"
	pinSockopsProg            = "prog_sockops"
	pinRedirectProg           = "prog_redirect"
	pinSockoptProg            = "prog_setsockopt"
	pinMeta                   = "meta"
	// A guard's new link, pinned under its name with this suffix until it
	// replaces the old one (pinReplacing).
	stagedSuffix = "_staged" // bpffs refuses names with dots
)

// guardLinks are the pins of the guards' links, which `up` replaces at every
// run.
var guardLinks = []string{pinGuardLink, pinFIONREADLink, pinSpliceWatchLink, pinSendfileWatchLink, pinIoUringSpliceWatchLink}

// mapNames are the maps that outlive the loader, pinned under their own names.
var mapNames = []string{"sock_hash", "sock_states", "local_addrs", "counters", "settings", "pending",
	"policy_ports", "policy_cidrs", "tuning_rules", "refusals", "refusal_gen", "refusing_ports",
	"cleared_ports", "probation_sockets"}

// metaMagic marks a pin directory as sockredir's.
var metaMagic = [8]byte{'s', 'o', 'c', 'k', 'r', 'e', 'd', 'r'}

// ABIVersion names the layout of the pinned maps. An upgrade in place reuses
// them, so it is possible only between builds with the same ABIVersion.
const ABIVersion = 5

// metaRecord is the value of the pinned meta map: what `up` was asked to do,
// for `status`, `down` and the next `up`.
type metaRecord struct {
	Magic   [8]byte
	ABI     uint32
	MapSize uint32
	Cgroup  [4088]byte // NUL-padded path
}

// checkABI refuses a datapath whose maps this build can't read or reuse.
func (m *metaRecord) checkABI(pinDir string) error {
	if m.ABI != ABIVersion {
		return fmt.Errorf("%s holds a datapath from a sockredir build with another map layout (version %d, this build %d): "+
			"run that build's `sockredir down`, or pass another --pin-dir", pinDir, m.ABI, ABIVersion)
	}
	return nil
}

func (m *metaRecord) cgroup() string {
	path, _, _ := bytes.Cut(m.Cgroup[:], []byte{0})
	return string(path)
}

// pins is a pin directory.
type pins string

func (p pins) path(name string) string { return filepath.Join(string(p), name) }

func (p pins) has(name string) bool {
	_, err := os.Stat(p.path(name))
	return err == nil
}

// lockTimeout is how long an up or a down waits for another one of the
// same pin directory: a down waits for readers up to its drain timeout.
const lockTimeout = 2 * time.Minute

// lock makes this process the only up or down of the pin directory until it
// calls unlock. A down waiting for readers must not have an up attach anew
// under it: the down would go on taking sockets out of the map, and
// unpinning what the up made, while the new programs redirect. The lock is
// a flock on the directory, which create makes first; without create, a
// missing directory (nothing is up) returns a nil unlock. Waiting for it
// ends with ctx.
func (p pins) lock(ctx context.Context, create bool) (unlock func(), err error) {
	deadline := time.Now().Add(lockTimeout)
	for {
		if create {
			if err := os.MkdirAll(string(p), 0o700); err != nil {
				return nil, fmt.Errorf("creating pin directory: %w", err)
			}
		}
		dir, err := os.Open(string(p))
		if errors.Is(err, os.ErrNotExist) && !create {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		switch err := unix.Flock(int(dir.Fd()), unix.LOCK_EX|unix.LOCK_NB); {
		case err == nil:
			// The down that held the lock may have removed the directory
			// meanwhile: what counts is the one there now.
			held, _ := dir.Stat()
			now, statErr := os.Stat(string(p))
			if statErr == nil && os.SameFile(held, now) {
				return func() { dir.Close() }, nil
			}
		case !errors.Is(err, unix.EWOULDBLOCK):
			dir.Close()
			return nil, fmt.Errorf("locking pin directory %s: %w", p, err)
		case time.Now().After(deadline):
			dir.Close()
			return nil, fmt.Errorf("another sockredir up or down has been working on %s for %s: wait for it, or stop it", p, lockTimeout)
		default:
			select {
			case <-ctx.Done():
				dir.Close()
				return nil, fmt.Errorf("stopped waiting for another sockredir up or down working on %s: %w", p, context.Cause(ctx))
			case <-time.After(50 * time.Millisecond):
			}
		}
		dir.Close()
	}
}

// meta returns the pinned metadata; nil, nil when the directory is missing or
// empty. A directory holding anything else is someone else's.
func (p pins) meta() (*metaRecord, error) {
	entries, err := os.ReadDir(string(p))
	if errors.Is(err, os.ErrNotExist) || (err == nil && len(entries) == 0) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	foreign := fmt.Errorf("pin directory %s holds pins that are not sockredir's: pass another --pin-dir, or remove them if they are stale", p)
	m, err := ebpf.LoadPinnedMap(p.path(pinMeta), nil)
	if err != nil {
		return nil, foreign
	}
	defer m.Close()
	var rec metaRecord
	if err := m.Lookup(uint32(0), &rec); err != nil || rec.Magic != metaMagic {
		return nil, foreign
	}
	return &rec, nil
}

// writeMeta pins a new meta map.
func (p pins) writeMeta(rec *metaRecord) error {
	m, err := ebpf.NewMap(&ebpf.MapSpec{
		Name:       "sockredir_meta",
		Type:       ebpf.Array,
		KeySize:    4,
		ValueSize:  uint32(binary.Size(rec)),
		MaxEntries: 1,
	})
	if err != nil {
		return fmt.Errorf("creating the meta map: %w", err)
	}
	defer m.Close()
	if err := m.Put(uint32(0), rec); err != nil {
		return err
	}
	return m.Pin(p.path(pinMeta))
}

// loadMaps opens the pinned maps that exist. The caller closes them.
func (p pins) loadMaps() (map[string]*ebpf.Map, error) {
	maps := make(map[string]*ebpf.Map)
	for _, name := range mapNames {
		if !p.has(name) {
			continue
		}
		m, err := ebpf.LoadPinnedMap(p.path(name), nil)
		if err != nil {
			closeMaps(maps)
			return nil, fmt.Errorf("opening pinned map %s: %w", name, err)
		}
		maps[name] = m
	}
	return maps, nil
}

func closeMaps(maps map[string]*ebpf.Map) {
	for _, m := range maps {
		m.Close()
	}
}

// pinProgram pins prog under name, replacing an older pin.
func (p pins) pinProgram(prog *ebpf.Program, name string) error {
	if err := os.Remove(p.path(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return prog.Pin(p.path(name))
}

// loadProgram opens a pinned program, or returns nil when there is none.
func (p pins) loadProgram(name string) (*ebpf.Program, error) {
	if !p.has(name) {
		return nil, nil
	}
	return ebpf.LoadPinnedProgram(p.path(name), nil)
}

// loadLink opens a pinned link, or returns nil when there is none.
func (p pins) loadLink(name string) (link.Link, error) {
	if !p.has(name) {
		return nil, nil
	}
	l, err := link.LoadPinnedLink(p.path(name), nil)
	if err != nil {
		return nil, fmt.Errorf("opening the pinned link %s: %w", name, err)
	}
	return l, nil
}

// linkedProgramID is the id of the program that the pinned link name runs,
// or 0 when there is no such link.
func (p pins) linkedProgramID(name string) (ebpf.ProgramID, error) {
	l, err := p.loadLink(name)
	if err != nil || l == nil {
		return 0, err
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return 0, fmt.Errorf("reading the pinned link %s: %w", name, err)
	}
	return info.Program, nil
}

// mapID is the id of the pinned map name.
func (p pins) mapID(name string) (ebpf.MapID, error) {
	m, err := ebpf.LoadPinnedMap(p.path(name), nil)
	if err != nil {
		return 0, err
	}
	defer m.Close()
	return mapID(m)
}

func mapID(m *ebpf.Map) (ebpf.MapID, error) {
	info, err := m.Info()
	if err != nil {
		return 0, err
	}
	id, ok := info.ID()
	if !ok {
		return 0, errors.New("this kernel doesn't tell a map's id")
	}
	return id, nil
}

// removeAll removes every pin sockredir makes, then the directory if that
// left it empty. Pins of anyone else stay.
func (p pins) removeAll() error {
	var errs []error
	// The meta map goes last: a removal cut short must leave a directory
	// that the next up or down still recognises as sockredir's.
	names := []string{pinLink, pinSockoptLink, pinSockopsProg, pinRedirectProg, pinSockoptProg}
	for _, guard := range guardLinks {
		// A staged link is left where an up was killed before it
		// replaced the old one.
		names = append(names, guard, guard+stagedSuffix)
	}
	for _, name := range append(append(names, mapNames...), pinMeta) {
		if err := os.Remove(p.path(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(string(p)); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
