package datapath

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/hostfs"
)

// DefaultDrainTimeout is how long Down waits, by default, for applications to
// read what was redirected to them.
const DefaultDrainTimeout = 30 * time.Second

// redirectStopGrace lets a sendmsg that saw redirecting still on finish
// before Down starts removing its peer from the map.
const redirectStopGrace = 200 * time.Millisecond

// ErrUnreadData says that Down stopped because applications have not read all
// that was redirected to them: removing their sockets would drop it.
var ErrUnreadData = errors.New("redirected bytes are still waiting for their applications to read them")

// DownOptions says what to detach.
type DownOptions struct {
	PinDir       string        // empty means DefaultPinDir
	DrainTimeout time.Duration // 0 means DefaultDrainTimeout
	Log          *zap.Logger   // nil means no logging
}

// Down detaches the datapath without losing a byte: it stops new redirects
// (connections carry on over TCP, which is order-safe because a receiver
// reads redirected bytes first), detaches from the cgroup, waits until every
// socket's redirected bytes have been read, takes the sockets out of the map,
// and only then removes the programs and maps. It reports whether anything
// was up. If readers don't catch up within the timeout it stops, leaves the
// rest in place, and returns ErrUnreadData: running it again resumes.
func Down(opts DownOptions) (bool, error) {
	if opts.PinDir == "" {
		opts.PinDir = DefaultPinDir
	}
	if opts.DrainTimeout < 0 {
		return false, fmt.Errorf("drain timeout %s is negative: pass a positive --drain-timeout (0 means %s)",
			opts.DrainTimeout, DefaultDrainTimeout)
	}
	if opts.DrainTimeout == 0 {
		opts.DrainTimeout = DefaultDrainTimeout
	}
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	if err := preflight(); err != nil {
		return false, err
	}
	if err := hostfs.EnsureBPFFS(opts.PinDir); err != nil {
		return false, err
	}
	p := pins(opts.PinDir)
	unlock, err := p.lock(context.Background(), false)
	if err != nil || unlock == nil {
		return false, err
	}
	defer unlock()
	meta, err := p.meta()
	if err != nil {
		return false, err
	}
	if meta == nil {
		// Empty: an up killed before its first pin made it.
		if err := os.Remove(opts.PinDir); err != nil && !errors.Is(err, os.ErrNotExist) {
			return false, err
		}
		return false, nil
	}
	if err := meta.checkABI(opts.PinDir); err != nil {
		return true, err
	}
	maps, err := p.loadMaps()
	if err != nil {
		return true, err
	}
	defer closeMaps(maps)

	if settings := maps["settings"]; settings != nil {
		if err := updateSettings(settings, func(s *sockopsSettings) { s.RedirectEnabled = 0 }); err != nil {
			return true, err
		}
	}
	for _, name := range []string{pinLink, pinSockoptLink} {
		if err := unpinLink(p, name); err != nil {
			return true, err
		}
	}
	if err := drain(maps, meta.cgroup(), opts); err != nil {
		return true, err
	}
	if err := detachRedirect(p, maps["sock_hash"]); err != nil {
		return true, err
	}
	if err := p.removeAll(); err != nil {
		return true, fmt.Errorf("removing pins: %w", err)
	}
	opts.Log.Info("down", zap.String("cgroup", meta.cgroup()), zap.String("pin_dir", opts.PinDir))
	return true, nil
}

// unpinLink detaches a program from the cgroup: the pin was the link's last
// reference.
func unpinLink(p pins, name string) error {
	l, err := p.loadLink(name)
	if err != nil || l == nil {
		return err
	}
	defer l.Close()
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpinning the link %s: %w", name, err)
	}
	return nil
}

// drain takes every socket out of sock_hash once nothing redirected to it is
// waiting to be read, unless it is one end of a splice pair; a socket's
// queue is freed when it leaves the map. A
// socket that the inspector can't see is treated as holding data: it leaves
// the map when its application closes it.
func drain(maps map[string]*ebpf.Map, cgroup string, opts DownOptions) error {
	sockHash := maps["sock_hash"]
	if sockHash == nil {
		return nil
	}
	time.Sleep(redirectStopGrace)
	deadline := time.Now().Add(opts.DrainTimeout)
	for {
		reports, err := inspectSockets(maps, cgroup)
		if err != nil {
			return err
		}
		waiting := 0
		var key sockopsSockKey
		var cookie uint64
		var drained []sockopsSockKey
		it := sockHash.Iterate()
		for it.Next(&key, &cookie) {
			if r, ok := reports[key]; ok && r.Unread == 0 && !inSplicePair(key, r, reports) {
				drained = append(drained, key)
			} else {
				waiting++
			}
		}
		if err := it.Err(); err != nil {
			// Sockets closing under the walk can end it early (the
			// kernel restarts a hash walk whose key went away): the
			// sockets it missed may hold data, so don't finish.
			opts.Log.Debug("walking the map again", zap.Error(err))
			waiting++
		}
		for _, k := range drained {
			if err := sockHash.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("removing a socket from the map: %w", err)
			}
		}
		if waiting == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: %d socket(s) after %v; acceleration is off and nothing was removed that holds data: "+
				"run `sockredir down` again once those applications have read it", ErrUnreadData, waiting, opts.DrainTimeout)
		}
		opts.Log.Debug("waiting for readers", zap.Int("sockets", waiting))
		time.Sleep(100 * time.Millisecond)
	}
}

// inSplicePair reports whether the socket under key (report r) redirects
// to a splice reader, or is one that its peer redirects to: the sender goes
// on after `down` too (bpf/redirect.c); one that hasn't sent yet won't
// redirect any more. Out of the map, the sender would send over TCP, and
// splice would read those bytes past the ones waiting; the reader would
// lose what its peer redirects after the inspection.
func inSplicePair(key sockopsSockKey, r socketReport, reports map[sockopsSockKey]socketReport) bool {
	var peerKey sockopsSockKey
	mirrorKey(&key, &peerKey)
	peer, ok := reports[peerKey]
	return ok && (r.Mode == modeRedirect && peer.Refused == refusedSplice || peer.Mode == modeRedirect && r.Refused == refusedSplice)
}

// detachRedirect takes the sk_msg program off the (now empty) map. A
// missing pin, or one that names another program than the one attached (an
// upgrade killed between attaching and pinning), leaves the program to be
// released with the map.
func detachRedirect(p pins, sockHash *ebpf.Map) error {
	prog, err := p.loadProgram(pinRedirectProg)
	if err != nil || prog == nil || sockHash == nil {
		return err
	}
	defer prog.Close()
	err = link.RawDetachProgram(link.RawDetachProgramOptions{
		Target:  sockHash.FD(),
		Program: prog,
		Attach:  ebpf.AttachSkMsgVerdict,
	})
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("detaching the sk_msg program: %w", err)
	}
	return nil
}
