package bench

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/policy"
	"github.com/sockredir/sockredir/pkg/sandbox"
)

// Config is one way of carrying the workloads' bytes.
type Config string

const (
	// TCP is plain TCP over loopback: the baseline.
	TCP Config = "tcp"
	// Sockredir is TCP over loopback with sockredir redirecting every
	// message into the peer's receive queue.
	Sockredir Config = "sockredir"
	// HookOnly is sockredir attached but passing every message to TCP:
	// what its hooks cost by themselves.
	HookOnly Config = "hook-only"
	// Unix is AF_UNIX stream sockets: no TCP at all, the ceiling.
	Unix Config = "unix"
)

// AllConfigs is every configuration, in the order reports show them.
var AllConfigs = []Config{TCP, Sockredir, HookOnly, Unix}

// Description says what the configuration is, for reports.
func (c Config) Description() string {
	switch c {
	case TCP:
		return "plain TCP over loopback"
	case Sockredir:
		return "sockredir: sk_msg redirect into the peer's receive queue"
	case HookOnly:
		return "sockredir attached, every message passed to TCP (the hooks' own cost)"
	case Unix:
		return "AF_UNIX stream sockets (no TCP at all)"
	}
	return string(c)
}

func (c Config) network() string {
	if c == Unix {
		return "unix"
	}
	return "tcp"
}

// accelerated says whether the configuration has a datapath attached.
func (c Config) accelerated() bool { return c == Sockredir || c == HookOnly }

// cleanupTimeout bounds the wait for workers to leave a cgroup and for
// readers to drain at the end.
const cleanupTimeout = 10 * time.Second

// env is the benchmark's sandbox: one network namespace for every worker,
// a cgroup per datapath (sockredir, hooks only) and one with nothing
// attached (TCP and AF_UNIX), each datapath pinned in a directory of its own.
type env struct {
	ns      *sandbox.Netns
	cgroups map[Config]*sandbox.Cgroup
	pinRoot string
	pinDirs map[Config]string
	log     *zap.Logger
}

// newEnv makes the sandbox and attaches the datapaths; on error it removes
// whatever it made.
func newEnv(log *zap.Logger) (_ *env, err error) {
	suffix := sandbox.RandomSuffix()
	e := &env{
		cgroups: map[Config]*sandbox.Cgroup{},
		pinRoot: filepath.Join(filepath.Dir(datapath.DefaultPinDir), "sockredir-bench-"+suffix),
		pinDirs: map[Config]string{},
		log:     log,
	}
	defer func() {
		if err != nil {
			if cerr := e.close(); cerr != nil {
				log.Error("cleaning up after a failed start", zap.Error(cerr))
			}
		}
	}()
	if e.ns, err = sandbox.NewNetns(); err != nil {
		return nil, err
	}
	plain, err := sandbox.NewCgroup("sockredir-bench-plain-")
	if err != nil {
		return nil, err
	}
	e.cgroups[TCP], e.cgroups[Unix] = plain, plain
	for _, c := range []struct {
		cfg      Config
		passOnly bool
	}{{Sockredir, false}, {HookOnly, true}} {
		cg, err := sandbox.NewCgroup("sockredir-bench-" + string(c.cfg) + "-")
		if err != nil {
			return nil, err
		}
		e.cgroups[c.cfg] = cg
		pinDir := filepath.Join(e.pinRoot, string(c.cfg))
		e.pinDirs[c.cfg] = pinDir
		// From inside the namespace, so that its addresses count as local.
		// The workers' servers read with recv(2) from non-blocking sockets:
		// probation would only hold each run's first connection on TCP.
		noProbation := &policy.Policy{Redirect: policy.Redirect{AccelerateNewPorts: true}}
		err = e.ns.Do(func() error {
			_, err := datapath.Up(datapath.Config{Cgroup: cg.Path, PinDir: pinDir, PassOnly: c.passOnly, Policy: noProbation, Log: log})
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("attaching sockredir for the %s runs: %w", c.cfg, err)
		}
	}
	return e, nil
}

// close detaches the datapaths and removes the cgroups, the pin directories
// and the namespace. The workers must have exited.
func (e *env) close() error {
	var errs []error
	for _, cfg := range []Config{Sockredir, HookOnly} {
		pinDir, ok := e.pinDirs[cfg]
		if !ok {
			continue
		}
		if _, err := datapath.Down(datapath.DownOptions{PinDir: pinDir, DrainTimeout: cleanupTimeout, Log: e.log}); err != nil {
			errs = append(errs, fmt.Errorf("detaching sockredir from %s: %w", pinDir, err))
		}
	}
	if err := os.Remove(e.pinRoot); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	removed := map[*sandbox.Cgroup]bool{}
	for _, cg := range e.cgroups {
		if removed[cg] {
			continue
		}
		removed[cg] = true
		if err := cg.Remove(cleanupTimeout); err != nil {
			errs = append(errs, err)
		}
	}
	if e.ns != nil {
		e.ns.Close()
	}
	return errors.Join(errs...)
}

// counters reads the counters of each datapath.
func (e *env) counters() (map[Config]datapath.Counters, error) {
	out := map[Config]datapath.Counters{}
	for cfg, pinDir := range e.pinDirs {
		st, err := datapath.ReadStatus(pinDir)
		if err != nil {
			return nil, fmt.Errorf("reading sockredir's counters: %w", err)
		}
		out[cfg] = st.Counters
	}
	return out, nil
}
