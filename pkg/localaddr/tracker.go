package localaddr

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// DefaultRescan is how often a Tracker looks for network namespaces that
// came or went in the cgroup, unless told otherwise.
const DefaultRescan = 2 * time.Second

// applyDelay gathers a burst of address changes (a new pod brings several)
// into one update of the datapath.
const applyDelay = 20 * time.Millisecond

// Tracker keeps the set of local addresses current, as OfCgroup defines it:
// it follows address changes in each namespace through netlink
// subscriptions, and looks for namespaces that came or went periodically
// (no event says that a process of the cgroup entered a namespace).
type Tracker struct {
	cgroup     string
	rescan     time.Duration
	apply      func([]netip.Addr) error
	log        *zap.Logger
	resync     chan struct{}
	addresses  atomic.Int64
	namespaces atomic.Int64
}

// NewTracker returns a tracker for cgroup that looks for namespaces every
// rescan (0 means DefaultRescan) and hands the whole set, sorted, to apply
// whenever it changed, and again at every rescan: whatever else wrote the
// set meanwhile (an `up`) is corrected, and a failed apply is tried again.
// A nil log means no logging.
func NewTracker(cgroup string, rescan time.Duration, apply func([]netip.Addr) error, log *zap.Logger) *Tracker {
	if rescan == 0 {
		rescan = DefaultRescan
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &Tracker{cgroup: cgroup, rescan: rescan, apply: apply, log: log, resync: make(chan struct{}, 1)}
}

// Addresses is how many local addresses the tracker knows.
func (t *Tracker) Addresses() int { return int(t.addresses.Load()) }

// Namespaces is how many network namespaces the tracker watches.
func (t *Tracker) Namespaces() int { return int(t.namespaces.Load()) }

// Resync makes the running tracker list every namespace's addresses afresh
// and hand the set to Apply even if it did not change.
func (t *Tracker) Resync() {
	select {
	case t.resync <- struct{}{}:
	default: // one is pending already
	}
}

// linkAddr is an address on one interface: the same address may be on two.
type linkAddr struct {
	link int
	ip   netip.Addr
}

// watch is one network namespace whose addresses are followed.
type watch struct {
	ns    netns.NsHandle
	addrs map[linkAddr]bool
	sub   *subscription
}

// subscription is one netlink subscription of a watch; a watch whose
// subscription broke (its socket overflowed) gets a new one.
type subscription struct {
	w    *watch
	stop chan struct{}
}

type addrEvent struct {
	sub    *subscription
	update netlink.AddrUpdate
	closed bool // the subscription ended on its own
}

// trackerState is what Run works on; only Run's goroutine touches it.
type trackerState struct {
	*Tracker
	watches     map[nsID]*watch
	events      chan addrEvent
	applied     []netip.Addr
	applyFailed bool
}

// Run tracks until ctx is done. It fails only when it can't follow the
// addresses of its own network namespace at the start; later failures, and
// other namespaces that can't be followed, are logged and tried again at
// the next rescan.
func (t *Tracker) Run(ctx context.Context) error {
	s := &trackerState{Tracker: t, watches: map[nsID]*watch{}, events: make(chan addrEvent)}
	defer s.unwatchAll()
	if _, err := s.rescanNamespaces(); err != nil {
		return err
	}
	s.applySet(true)
	ticker := time.NewTicker(t.rescan)
	defer ticker.Stop()
	var applyTimer <-chan time.Time
	for {
		changed := false
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
			var err error
			if changed, err = s.rescanNamespaces(); err != nil {
				// The namespaces already followed still are.
				s.log.Warn("cannot look for network namespaces; trying again later", zap.Error(err))
			}
			if !changed {
				s.applySet(true)
			}
		case <-t.resync:
			for _, w := range s.watches {
				if err := s.relist(w); err != nil {
					s.log.Warn("cannot list the addresses of a network namespace", zap.Error(err))
				}
			}
			s.applySet(true)
		case ev := <-s.events:
			changed = s.handle(ev)
		case <-applyTimer:
			applyTimer = nil
			s.applySet(false)
		}
		if changed && applyTimer == nil {
			applyTimer = time.After(applyDelay)
		}
	}
}

// rescanNamespaces watches the namespaces that joined the cgroup and drops
// those that left it, and reports whether there were any. It fails only for
// this process's own namespace.
func (s *trackerState) rescanNamespaces() (changed bool, err error) {
	namespaces, err := CgroupNamespaces(s.cgroup)
	if err != nil {
		return false, fmt.Errorf("finding the network namespaces of cgroup %s: %w", s.cgroup, err)
	}
	current := map[nsID]bool{}
	for i, ns := range namespaces {
		id, err := idOf(ns)
		if err == nil {
			current[id] = true
		}
		if err != nil || s.watches[id] != nil {
			ns.Close()
			continue
		}
		w := &watch{ns: ns}
		if err := s.subscribe(w); err != nil {
			ns.Close()
			if i == 0 {
				closeAll(namespaces[i+1:])
				return false, fmt.Errorf("following the addresses of this network namespace: %w", err)
			}
			s.log.Warn("cannot follow the addresses of a network namespace of the cgroup; trying again later",
				zap.Stringer("namespace", id), zap.Error(err))
			continue
		}
		s.watches[id] = w
		changed = true
		s.log.Debug("following a network namespace", zap.Stringer("namespace", id))
	}
	for id, w := range s.watches {
		if !current[id] {
			s.unwatch(w)
			delete(s.watches, id)
			changed = true
			s.log.Debug("no process of the cgroup is left in a network namespace", zap.Stringer("namespace", id))
		}
	}
	s.namespaces.Store(int64(len(s.watches)))
	return changed, nil
}

// subscribe starts following w's namespace, then lists its addresses: an
// address that changes in between is in both, and the events that follow
// the list leave the right state.
func (s *trackerState) subscribe(w *watch) error {
	sub := &subscription{w: w, stop: make(chan struct{})}
	updates := make(chan netlink.AddrUpdate)
	ns := w.ns
	err := netlink.AddrSubscribeWithOptions(updates, sub.stop, netlink.AddrSubscribeOptions{
		Namespace: &ns,
		ErrorCallback: func(err error) {
			select {
			case <-sub.stop: // closing the socket ends the subscription
			default:
				s.log.Debug("address subscription", zap.Error(err))
			}
		},
	})
	if err != nil {
		close(sub.stop)
		return err
	}
	go s.forward(sub, updates)
	w.sub = sub
	if err := s.relist(w); err != nil {
		close(sub.stop)
		w.sub = nil
		return err
	}
	return nil
}

// forward passes a subscription's updates to Run until it ends. After stop
// it keeps reading, so that the subscription's goroutine can finish.
func (s *trackerState) forward(sub *subscription, updates <-chan netlink.AddrUpdate) {
	for u := range updates {
		select {
		case s.events <- addrEvent{sub: sub, update: u}:
		case <-sub.stop:
		}
	}
	select {
	case s.events <- addrEvent{sub: sub, closed: true}:
	case <-sub.stop:
	}
}

// relist replaces w's addresses with a fresh listing.
func (s *trackerState) relist(w *watch) error {
	h, err := netlink.NewHandleAt(w.ns, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer h.Close()
	addrs, err := listAddrs(h.AddrList)
	if err != nil {
		return err
	}
	w.addrs = map[linkAddr]bool{}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			w.addrs[linkAddr{a.LinkIndex, ip.Unmap()}] = true
		}
	}
	return nil
}

// handle applies one event to its watch and reports whether anything changed.
func (s *trackerState) handle(ev addrEvent) bool {
	w := ev.sub.w
	if w.sub != ev.sub {
		return false // from a subscription that was replaced or stopped
	}
	if ev.closed {
		// The socket overflowed and events were lost: start afresh.
		s.log.Warn("address updates of a network namespace were lost; listing its addresses again")
		close(ev.sub.stop)
		w.sub = nil
		if err := s.subscribe(w); err != nil {
			s.log.Warn("cannot follow the addresses of a network namespace; trying again at the next rescan", zap.Error(err))
			s.dropWatch(w)
		}
		return true
	}
	ip, ok := netip.AddrFromSlice(ev.update.LinkAddress.IP)
	if !ok {
		return false
	}
	key := linkAddr{ev.update.LinkIndex, ip.Unmap()}
	if w.addrs[key] == ev.update.NewAddr {
		return false
	}
	if ev.update.NewAddr {
		w.addrs[key] = true
	} else {
		delete(w.addrs, key)
	}
	return true
}

// dropWatch forgets w; a rescan that still finds its namespace watches it anew.
func (s *trackerState) dropWatch(w *watch) {
	for id, other := range s.watches {
		if other == w {
			delete(s.watches, id)
		}
	}
	s.unwatch(w)
	s.namespaces.Store(int64(len(s.watches)))
}

func (s *trackerState) unwatch(w *watch) {
	if w.sub != nil {
		close(w.sub.stop)
		w.sub = nil
	}
	w.ns.Close()
}

func (s *trackerState) unwatchAll() {
	for id, w := range s.watches {
		s.unwatch(w)
		delete(s.watches, id)
	}
	s.namespaces.Store(0)
}

// applySet hands the union of all namespaces' addresses to apply when it
// changed, or always when forced.
func (s *trackerState) applySet(force bool) {
	var all []netip.Addr
	for _, w := range s.watches {
		for a := range w.addrs {
			all = append(all, a.ip)
		}
	}
	slices.SortFunc(all, netip.Addr.Compare)
	all = slices.Compact(all)
	s.addresses.Store(int64(len(all)))
	if !force && !s.applyFailed && slices.Equal(all, s.applied) {
		return
	}
	if err := s.apply(all); err != nil {
		s.applyFailed = true
		s.log.Error("could not update the datapath's local addresses; trying again at the next rescan", zap.Error(err))
		return
	}
	added, removed := difference(all, s.applied), difference(s.applied, all)
	if len(added) > 0 || len(removed) > 0 {
		s.log.Info("local addresses changed", zap.Stringers("added", added), zap.Stringers("removed", removed),
			zap.Int("addresses", len(all)), zap.Int("namespaces", len(s.watches)))
	}
	s.applied, s.applyFailed = all, false
}

// difference returns the addresses of a that are not in b; both are sorted.
func difference(a, b []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, x := range a {
		if _, found := slices.BinarySearchFunc(b, x, netip.Addr.Compare); !found {
			out = append(out, x)
		}
	}
	return out
}

func (id nsID) String() string { return fmt.Sprintf("net:[%d]", id.ino) }
