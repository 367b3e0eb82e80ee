package datapath

import (
	"context"
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"go.uber.org/zap"

	"github.com/sockredir/sockredir/pkg/hostfs"
	"github.com/sockredir/sockredir/pkg/localaddr"
	"github.com/sockredir/sockredir/pkg/policy"
)

// Config says where to attach and how.
type Config struct {
	// Cgroup is the cgroup v2 directory whose sockets are accelerated;
	// empty means the root of the cgroup v2 hierarchy.
	Cgroup string
	// PinDir holds the pins that keep the datapath attached after the
	// loader exits; empty means DefaultPinDir.
	PinDir string
	// MapSize is how many sockets sock_hash holds; 0 means DefaultMapSize
	// for a new datapath and the size it has for one that is up. The size
	// of a datapath that is up can't change: another one is an error
	// (ErrMapSizeFixed), unless KeepMapSize.
	MapSize uint32
	// KeepMapSize makes Up keep the size of a datapath that is up, with a
	// warning, where MapSize asks for another.
	KeepMapSize bool
	// PassOnly pairs sockets as usual but sends every message over TCP,
	// which measures what the hooks alone cost.
	PassOnly bool
	// Policy says which connections to accelerate and how to tune
	// connections; nil accelerates every local connection and tunes none.
	// Running Up again with another policy replaces it in place.
	Policy *policy.Policy
	// Log receives progress; nil means no logging.
	Log *zap.Logger
}

func (c Config) withDefaults() (Config, error) {
	cgroup, err := hostfs.ResolveCgroup(c.Cgroup)
	if err != nil {
		return c, err
	}
	c.Cgroup = cgroup
	if c.PinDir == "" {
		c.PinDir = DefaultPinDir
	}
	if c.MapSize == 0 {
		c.MapSize = DefaultMapSize
	}
	if c.Log == nil {
		c.Log = zap.NewNop()
	}
	return c, nil
}

// ErrMapSizeFixed says that Up was asked for another map size than the
// datapath that is up has: a map's size is set when it is created.
var ErrMapSizeFixed = errors.New("the map size can't change while sockredir is up")

// UpResult says what Up did.
type UpResult string

const (
	Attached  UpResult = "attached"
	AlreadyUp UpResult = "already up"
	Upgraded  UpResult = "upgraded"
)

// Up attaches the datapath to the cgroup and pins it. When it is already up
// with the same programs, it keeps them and only writes the policy and
// settings, the local addresses and the guards afresh; with other programs (a
// new build), it swaps them in place, keeping the maps and so every running
// connection. On error, whatever this call created is removed again.
func Up(cfg Config) (UpResult, error) {
	return UpContext(context.Background(), cfg)
}

// UpContext is Up that stops waiting for another up or down of the pin
// directory when ctx is done. Once it has the directory, it finishes: a
// datapath left half-attached would be worse than one attached late.
func UpContext(ctx context.Context, cfg Config) (UpResult, error) {
	requestedSize := cfg.MapSize
	cfg, err := cfg.withDefaults()
	if err != nil {
		return "", err
	}
	if err := preflight(); err != nil {
		return "", err
	}
	if err := hostfs.CheckCgroup(cfg.Cgroup); err != nil {
		return "", err
	}
	if err := hostfs.EnsureBPFFS(cfg.PinDir); err != nil {
		return "", err
	}
	p := pins(cfg.PinDir)
	unlock, err := p.lock(ctx, true)
	if err != nil {
		return "", err
	}
	defer unlock()
	meta, err := p.meta()
	if err != nil {
		return "", err
	}
	if meta != nil {
		if err := compatible(meta, cfg); err != nil {
			return "", err
		}
		if requestedSize != 0 && requestedSize != meta.MapSize {
			err := fmt.Errorf("%w: the sockhash under %s holds %d sockets, not %d: "+
				"run `sockredir down --pin-dir %s`, then up with the new size", ErrMapSizeFixed, cfg.PinDir, meta.MapSize, requestedSize, cfg.PinDir)
			if !cfg.KeepMapSize {
				return "", err
			}
			cfg.Log.Warn("keeping the map size of the datapath that is up", zap.Error(err))
		}
		cfg.MapSize = meta.MapSize
	}

	res, err := up(cfg, p, meta)
	if err != nil && meta == nil {
		// Closing the objects detached what this call attached; its pins
		// are all that is left.
		if rmErr := p.removeAll(); rmErr != nil {
			cfg.Log.Warn("could not remove the pins of a failed up", zap.Error(rmErr))
		}
	}
	return res, err
}

// compatible reports whether an existing datapath can be kept or upgraded.
func compatible(meta *metaRecord, cfg Config) error {
	if err := meta.checkABI(cfg.PinDir); err != nil {
		return err
	}
	if meta.cgroup() != cfg.Cgroup {
		return fmt.Errorf("%s is attached to cgroup %s, not %s: run `sockredir down --pin-dir %s` first, or pass another --pin-dir",
			cfg.PinDir, meta.cgroup(), cfg.Cgroup, cfg.PinDir)
	}
	return nil
}

func up(cfg Config, p pins, meta *metaRecord) (UpResult, error) {
	if meta == nil {
		rec := metaRecord{Magic: metaMagic, ABI: ABIVersion, MapSize: cfg.MapSize}
		if len(cfg.Cgroup) >= len(rec.Cgroup) {
			return "", fmt.Errorf("cgroup path %s is too long", cfg.Cgroup)
		}
		copy(rec.Cgroup[:], cfg.Cgroup)
		if err := p.writeMeta(&rec); err != nil {
			return "", err
		}
	}

	pinned, err := p.loadMaps()
	if err != nil {
		return "", err
	}
	defer closeMaps(pinned)
	objs, err := loadObjects(cfg.MapSize, pinned)
	if err != nil {
		return "", err
	}
	defer objs.Close()
	for name, m := range objs.maps() {
		if pinned[name] != nil {
			continue
		}
		if err := m.Pin(p.path(name)); err != nil {
			return "", fmt.Errorf("pinning map %s: %w", name, err)
		}
	}

	running, err := isRunning(p, objs)
	if err != nil {
		return "", err
	}
	if err := syncLocalAddrs(objs.sockops.LocalAddrs, cfg.Cgroup); errors.Is(err, ErrLocalAddrsFull) {
		cfg.Log.Warn("not every local address is accelerated", zap.Error(err))
	} else if err != nil {
		return "", err
	}
	// Also when already up: the guards aren't compared (which of them a
	// kernel gets is decided by probing), and attached afresh a new
	// build's take over without a gap.
	if err := attachGuards(p, objs.maps(), cfg.Log); err != nil {
		return "", err
	}
	// Also when already up: a `down` that was interrupted may have switched
	// redirecting off.
	if err := configure(objs, cfg); err != nil {
		return "", err
	}
	if running {
		cfg.Log.Info("already up", zap.String("cgroup", cfg.Cgroup), zap.String("pin_dir", cfg.PinDir))
		return AlreadyUp, nil
	}
	// Sockets already in the map keep the program they were added with;
	// new ones get this one.
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target:  objs.sockops.SockHash.FD(),
		Program: objs.redirect.SockredirRedirect,
		Attach:  ebpf.AttachSkMsgVerdict,
	}); err != nil {
		return "", fmt.Errorf("attaching the sk_msg program to the sockhash: %w", err)
	}
	// down detaches the sk_msg program by the pinned one: pin what is
	// attached.
	if err := p.pinProgram(objs.redirect.SockredirRedirect, pinRedirectProg); err != nil {
		return "", err
	}

	// setsockopt first: a socket that sock_ops pairs must already be
	// watched. The sock_ops attachment comes last: until it exists nothing
	// enters the map, and a loader killed before it pins the link leaves
	// nothing attached (an unpinned link dies with its process).
	if _, err := attachToCgroup(p, pinSockoptLink, cfg.Cgroup, ebpf.AttachCGroupSetsockopt, objs.sockopt.SockredirSetsockopt, "setsockopt"); err != nil {
		return "", err
	}
	if err := p.pinProgram(objs.sockopt.SockredirSetsockopt, pinSockoptProg); err != nil {
		return "", err
	}
	upgraded, err := attachToCgroup(p, pinLink, cfg.Cgroup, ebpf.AttachCGroupSockOps, objs.sockops.SockredirSockops, "sock_ops")
	if err != nil {
		return "", err
	}
	if err := p.pinProgram(objs.sockops.SockredirSockops, pinSockopsProg); err != nil {
		return "", err
	}
	if upgraded {
		cfg.Log.Info("upgraded in place", zap.String("cgroup", cfg.Cgroup), zap.String("pin_dir", cfg.PinDir))
		return Upgraded, nil
	}
	cfg.Log.Info("attached", zap.String("cgroup", cfg.Cgroup), zap.String("pin_dir", cfg.PinDir),
		zap.Uint32("map_size", cfg.MapSize))
	return Attached, nil
}

// attachToCgroup attaches the kind program prog to the cgroup with a link
// pinned as pinName or, when that link exists, swaps its program in place (an
// upgrade, which it reports).
func attachToCgroup(p pins, pinName, cgroup string, attach ebpf.AttachType, prog *ebpf.Program, kind string) (upgraded bool, err error) {
	pinned, err := p.loadLink(pinName)
	if err != nil {
		return false, err
	}
	if pinned != nil {
		defer pinned.Close()
		if err := pinned.Update(prog); err != nil {
			return false, fmt.Errorf("replacing the %s program: %w", kind, err)
		}
		return true, nil
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: attach, Program: prog})
	if err != nil {
		return false, fmt.Errorf("attaching the %s program to cgroup %s: %w", kind, cgroup, err)
	}
	defer l.Close()
	if err := l.Pin(p.path(pinName)); err != nil {
		return false, fmt.Errorf("pinning the %s link: %w", kind, err)
	}
	return false, nil
}

// isRunning reports whether this build's programs are the ones at work:
// the pins name them (the kernel's tag hashes the instructions) and the
// cgroup links run the pinned ones. The links are asked, not only the pins,
// because an upgrade that failed half-way may have left a link on the old
// program.
func isRunning(p pins, objs *objects) (bool, error) {
	pinnedIDs := map[string]ebpf.ProgramID{}
	for name, prog := range map[string]*ebpf.Program{
		pinSockopsProg:  objs.sockops.SockredirSockops,
		pinRedirectProg: objs.redirect.SockredirRedirect,
		pinSockoptProg:  objs.sockopt.SockredirSetsockopt,
	} {
		pinned, err := p.loadProgram(name)
		if err != nil || pinned == nil {
			return false, err
		}
		pinnedInfo, err := pinned.Info()
		pinned.Close()
		if err != nil {
			return false, err
		}
		info, err := prog.Info()
		if err != nil {
			return false, err
		}
		if pinnedInfo.Tag != info.Tag {
			return false, nil
		}
		pinnedIDs[name], _ = pinnedInfo.ID()
	}
	for linkName, progName := range map[string]string{pinLink: pinSockopsProg, pinSockoptLink: pinSockoptProg} {
		id, err := p.linkedProgramID(linkName)
		if err != nil || id == 0 || id != pinnedIDs[progName] {
			return false, err
		}
	}
	return true, nil
}

// configure writes cfg's policy and switches redirecting on.
func configure(o *objects, cfg Config) error {
	flags, rules, err := writePolicy(o, cfg.Policy)
	if err != nil {
		return err
	}
	return updateSettings(o.sockops.Settings, func(s *sockopsSettings) {
		*s = sockopsSettings{RedirectEnabled: 1, PassOnly: boolToU32(cfg.PassOnly), Policy: flags, TuningRules: rules}
	})
}

// updateSettings changes the datapath's settings in place.
func updateSettings(m *ebpf.Map, change func(*sockopsSettings)) error {
	var s sockopsSettings
	if err := m.Lookup(uint32(0), &s); err != nil {
		return fmt.Errorf("reading the datapath's settings: %w", err)
	}
	change(&s)
	if err := m.Put(uint32(0), &s); err != nil {
		return fmt.Errorf("writing the datapath's settings: %w", err)
	}
	return nil
}

func boolToU32(b bool) uint32 {
	if b {
		return 1
	}
	return 0
}

// syncLocalAddrs makes the local_addrs map hold exactly the addresses of
// this network namespace and of those that processes of the cgroup are in.
func syncLocalAddrs(m *ebpf.Map, cgroup string) error {
	addrs, err := localaddr.OfCgroup(cgroup)
	if err != nil {
		return err
	}
	return replaceLocalAddrs(m, addrs)
}
