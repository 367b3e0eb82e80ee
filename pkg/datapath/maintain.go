package datapath

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"go.uber.org/zap"

	"github.com/sockredir/sockredir/pkg/localaddr"
)

// DefaultCheckInterval is how often to check unless told otherwise: what a
// fast sender redirects in this time adds to the backlog limit. A check
// costs about a millisecond of CPU on this project's VM with few sockets
// (5% of a CPU at 20 ms).
const DefaultCheckInterval = 100 * time.Millisecond

// settleTime is how long a pair must look settled before it is released: a
// redirect decided before the switch to TCP may still be on its way (the
// kernel drops the sender's lock while it delivers), and releasing its
// receiver under it would fail that write.
const settleTime = 100 * time.Millisecond

// abandonTime is how long a splice reader's redirected bytes may go unread
// before its connection is aborted: splice(2) can't read them, but an
// application that also reads with recv(2) would.
const abandonTime = time.Second

// refusedSplice is REFUSED_SPLICE of enum refusal (bpf/sockredir.h).
const refusedSplice = 5

// reopenBackoff is how long a datapath that could not be opened is left
// alone before the checks try again (each try opens every namespace of the
// cgroup and loads the inspector).
const reopenBackoff = 5 * time.Second

// MODE_REDIRECT and MODE_PASS of enum redirect_mode (bpf/sockredir.h).
const (
	modeRedirect = 1
	modePass     = 2
)

// A Maintainer does what a running datapath needs done from outside the
// kernel, over and over (`sockredir daemon` runs it every 100 ms):
//
//   - Backpressure. tcp_bpf queues redirected bytes at the receiver without
//     limit: a reader that falls behind would let them pile up until the
//     host runs out of TCP memory, and the sender would then get ENOMEM. A
//     socket with more than MaxBacklog() redirected bytes waiting puts its
//     connection back on TCP, whose receive window holds the sender back;
//     the reader gets the redirected bytes first, so nothing is reordered.
//     The bound holds at each check: what arrives in between adds to it.
//   - Release. A connection that went back to TCP (a refusal, pass-only
//     mode, a splice reader whose peer had sent nothing) still pays
//     tcp_bpf's costs, and tcp_bpf answers FIONREAD wrongly for TCP bytes on
//     some kernels. A socket that still redirects in a refused connection
//     is told to pass, as its next message would. Once both sockets pass
//     and neither has redirected bytes left to read, for at least
//     settleTime, they leave sock_hash and are plain TCP sockets again.
//   - Abandoned bytes. Where the splice guard can't load, the splice watch
//     notices a socket that starts to splice(2), and its server port stays
//     on TCP from then on. Its own connection can't be saved: splice can't
//     read what is redirected to it, and switching its peer to TCP would
//     leave a hole. Left alone, it would wait forever; once its queue has
//     gone unread for abandonTime, it is aborted instead (ECONNABORTED for
//     the splice reader, a reset for its peer), which applications handle
//     like any broken connection.
//
// It is not safe for concurrent use.
type Maintainer struct {
	maxBacklog uint64
	pinDir     string
	maps       map[string]*ebpf.Map
	sockHashID ebpf.MapID // which sock_hash the checks look after
	inspector  *inspector
	namespaces *localaddr.Namespaces        // looked at again at every check: a new pod's sockets count at once
	settled    map[sockopsSockKey]time.Time // by the key that releases them, since first seen settled
	abandoned  map[sockopsSockKey]unreadSince
	aborting   []sockopsSockKey // in the inspector's aborts since the last check
	stopping   []sockopsSockKey // in the inspector's stop_redirecting since the last check
	canAbort   bool             // whether the kernel lets the inspector abort a connection
	// A datapath that could not be opened: which sock_hash, why, and when
	// to try again.
	failedID  ebpf.MapID
	failedErr error
	retryAt   time.Time
}

// unreadSince is a queue that nobody reads: its size, and since when.
type unreadSince struct {
	unread uint64
	since  time.Time
}

// MaxBacklog is the most redirected bytes a socket may have waiting.
func (m *Maintainer) MaxBacklog() uint64 { return m.maxBacklog }

// CheckResult is what one Check did.
type CheckResult struct {
	OverBacklog int  // sockets over the backlog limit: their connections went back to TCP
	Released    int  // sockets taken out of sock_hash, back to plain TCP
	Aborted     int  // connections aborted: their splice reader can't read what was redirected to it
	Reopened    bool // a `down` and a new `up` had replaced the maps; this check and the next look after the new ones
}

// NewMaintainer prepares checks of the datapath pinned in pinDir
// (DefaultPinDir if empty); maxBacklog 0 means DefaultMaxBacklog.
func NewMaintainer(pinDir string, maxBacklog uint64) (*Maintainer, error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	if maxBacklog == 0 {
		var err error
		if maxBacklog, err = DefaultMaxBacklog(); err != nil {
			return nil, err
		}
	}
	p := pins(pinDir)
	meta, err := p.meta()
	if err != nil {
		return nil, err
	}
	if meta == nil || !p.has(pinLink) {
		return nil, notUp(pinDir)
	}
	if err := meta.checkABI(pinDir); err != nil {
		return nil, err
	}
	maps, err := p.loadMaps()
	if err != nil {
		return nil, err
	}
	if len(maps) != len(mapNames) {
		// A down is removing the pins (or someone did by hand).
		closeMaps(maps)
		return nil, notUp(pinDir)
	}
	sockHashID, err := mapID(maps["sock_hash"])
	if err != nil {
		closeMaps(maps)
		return nil, err
	}
	namespaces, err := localaddr.OpenNamespaces(meta.cgroup())
	if err != nil {
		closeMaps(maps)
		return nil, err
	}
	in, err := newInspector(maps, maxBacklog)
	if err != nil {
		namespaces.Close()
		closeMaps(maps)
		return nil, err
	}
	return &Maintainer{maxBacklog: maxBacklog, pinDir: pinDir, maps: maps, sockHashID: sockHashID, inspector: in,
		namespaces: namespaces, settled: map[sockopsSockKey]time.Time{}, abandoned: map[sockopsSockKey]unreadSince{},
		// The inspector aborts connections through the bpf_sock_destroy
		// kfunc (6.5 and later); without it, those calls are left out
		// when it loads.
		canAbort: kernelHas[btf.Func]("bpf_sock_destroy")}, nil
}

// kernelHas reports whether the running kernel's BTF names a T (a btf.Func,
// a btf.Struct) called name.
func kernelHas[T any](name string) bool {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return false
	}
	var typ *T
	return spec.TypeByName(name, &typ) == nil
}

// Check runs once over the cgroup's sockets.
func (m *Maintainer) Check() (CheckResult, error) {
	var res CheckResult
	var err error
	if res.Reopened, err = m.followPins(); err != nil {
		return res, err
	}
	if err := m.namespaces.Refresh(); err != nil {
		return res, fmt.Errorf("finding the cgroup's network namespaces: %w", err)
	}
	reports, err := m.inspector.inspect(m.namespaces.Handles())
	if err != nil {
		return res, err
	}
	now := time.Now()
	settledNow := map[sockopsSockKey]time.Time{}
	for key, r := range reports {
		if r.Unread > m.maxBacklog {
			res.OverBacklog++
		}
		release := settledWith(key, r, reports)
		if len(release) == 0 {
			continue
		}
		since, seen := m.settled[key]
		if !seen {
			since = now
		}
		if now.Sub(since) < settleTime {
			settledNow[key] = since
			continue
		}
		for _, k := range release {
			switch err := m.maps["sock_hash"].Delete(&k); {
			case err == nil:
				res.Released++
			case !errors.Is(err, ebpf.ErrKeyNotExist): // closed meanwhile: gone already
				return res, fmt.Errorf("releasing a socket from the map: %w", err)
			}
			// Its refusal has done its work: a plain TCP socket has
			// nobody to tell. Left in the LRU map, it would push out
			// the refusals still on their way to a peer.
			if err := m.maps["refusals"].Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return res, fmt.Errorf("forgetting a released socket's refusal: %w", err)
			}
		}
	}
	m.settled = settledNow
	if err := m.stopRedirecting(reports); err != nil {
		return res, err
	}
	aborted, err := m.abortAbandoned(reports, now)
	res.Aborted = aborted
	return res, err
}

// stopRedirecting tells the inspector which sockets are to send over TCP
// from its next look on (sendersToStop). It first deletes what the
// last check told: the inspector deletes each entry it acts on, so any
// left belong to sockets that closed.
func (m *Maintainer) stopRedirecting(reports map[sockopsSockKey]socketReport) error {
	for _, key := range m.stopping {
		if err := m.inspector.objs.StopRedirecting.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("clearing the sockets to stop redirecting: %w", err)
		}
	}
	m.stopping = sendersToStop(reports)
	// More than fit wait for the next checks (the map order varies).
	if limit := int(m.inspector.objs.StopRedirecting.MaxEntries()); len(m.stopping) > limit {
		m.stopping = m.stopping[:limit]
	}
	for _, key := range m.stopping {
		if err := m.inspector.objs.StopRedirecting.Put(&key, uint8(1)); err != nil {
			return fmt.Errorf("marking a socket to stop redirecting: %w", err)
		}
	}
	return nil
}

// sendersToStop returns the sockets that still redirect (or haven't sent
// yet) but are to pass, so that their pair can be released (bpf/inspect.c,
// turn_pair_to_tcp; the inspector leaves one whose peer has begun to splice
// since):
//   - in a connection that either socket refused for another reason than
//     splice: its next message would pass anyway. Its peer must not splice:
//     its TCP bytes would reach the splicer past those waiting for it;
//   - a splice reader whose peer sends over TCP, doesn't splice itself and
//     has nothing waiting. One whose peer redirects goes on redirecting
//     too, or its bytes would reach over TCP a socket still in sock_hash.
//     Unread: the peer may yet begin to splice while bytes this socket
//     redirected wait for it (the inspector looks again).
func sendersToStop(reports map[sockopsSockKey]socketReport) []sockopsSockKey {
	var stop []sockopsSockKey
	for key, r := range reports {
		var peerKey sockopsSockKey
		mirrorKey(&key, &peerKey)
		peer, ok := reports[peerKey]
		if r.Mode == modePass || !ok || peer.Refused == refusedSplice {
			continue
		}
		refused := refusedOtherwise(r) || refusedOtherwise(peer)
		splicerDone := r.Refused == refusedSplice && peer.Mode == modePass && peer.Unread == 0
		if refused || splicerDone {
			stop = append(stop, key)
		}
	}
	return stop
}

// refusedOtherwise reports whether a socket refused redirected bytes for
// another reason than splice.
func refusedOtherwise(r socketReport) bool {
	return r.Refused != 0 && r.Refused != refusedSplice
}

// followPins makes the checks look after the maps pinned now: after a `down`
// and a new `up`, the maps held so far are orphans, and the new ones hold
// the sockets. While nothing is up it holds nothing, pods' namespaces
// included.
func (m *Maintainer) followPins() (reopened bool, err error) {
	p := pins(m.pinDir)
	id, err := p.mapID("sock_hash")
	if errors.Is(err, os.ErrNotExist) {
		m.Close()
		return false, notUp(m.pinDir)
	}
	if err != nil || id == m.sockHashID {
		return false, err
	}
	m.Close()
	if id == m.failedID && time.Now().Before(m.retryAt) {
		return false, m.failedErr
	}
	fresh, err := NewMaintainer(m.pinDir, m.maxBacklog)
	if err != nil {
		err = fmt.Errorf("opening the datapath that a new up attached: %w", err)
		if !errors.Is(err, ErrNotUp) { // an up still under way: try at the next check
			m.failedID, m.failedErr, m.retryAt = id, err, time.Now().Add(reopenBackoff)
		}
		return false, err
	}
	*m = *fresh
	return true, nil
}

// abortAbandoned marks for abortion, at the next check, the sockets that
// abandonedQueues finds; it returns how many it marked. Marks the last check
// left are gone: their sockets were aborted or closed.
func (m *Maintainer) abortAbandoned(reports map[sockopsSockKey]socketReport, now time.Time) (int, error) {
	for _, key := range m.aborting {
		if err := m.inspector.objs.Aborts.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return 0, fmt.Errorf("clearing the connections to abort: %w", err)
		}
	}
	if !m.canAbort {
		// Such a connection waits until its peer closes (docs/correctness.md).
		return 0, nil
	}
	m.abandoned, m.aborting = abandonedQueues(m.abandoned, reports, now)
	for i, key := range m.aborting {
		// The inspector aborts it only if its queue hasn't shrunk since.
		if err := m.inspector.objs.Aborts.Put(&key, reports[key].Unread); err != nil {
			return i, fmt.Errorf("marking a connection to abort: %w", err)
		}
	}
	return len(m.aborting), nil
}

// abandonedQueues returns the sockets that splice and whose redirected
// bytes have not been read for abandonTime (abandoned), and how long the
// others with bytes waiting have gone unread (watched, for the next call).
func abandonedQueues(watched map[sockopsSockKey]unreadSince, reports map[sockopsSockKey]socketReport,
	now time.Time) (stillWatched map[sockopsSockKey]unreadSince, abandoned []sockopsSockKey) {
	stillWatched = map[sockopsSockKey]unreadSince{}
	for key, r := range reports {
		if r.Refused != refusedSplice || r.Unread == 0 {
			continue
		}
		// The queue may still grow, as its peer goes on redirecting;
		// any shrinking means someone reads it.
		was, seen := watched[key]
		if !seen || r.Unread < was.unread {
			was.since = now
		}
		was.unread = r.Unread
		if now.Sub(was.since) < abandonTime {
			stillWatched[key] = was
			continue
		}
		abandoned = append(abandoned, key)
	}
	return stillWatched, abandoned
}

// settledWith returns the pair of the socket under key (its own report r)
// to release, if nothing will be redirected between the two again and
// nothing redirected is left to read; only for the lower of the two keys, so
// that each pair is handled once. A socket won't redirect again once it
// passes: nothing sets a socket back to redirecting. A refusal is not
// enough, though the socket's next message would find it: a reader that
// refused may begin to splice, and its peer then goes on redirecting (see
// bpf/splicewatch.c), into a queue that the release would free. Refused
// connections come to pass both ways (sendersToStop), and so does a pair
// whose splice reader's peer had sent nothing. (A socket is never in the
// map without its peer for longer than a handshake: sock_ops takes a client
// out again when its server stays out.)
func settledWith(key sockopsSockKey, r socketReport, reports map[sockopsSockKey]socketReport) []sockopsSockKey {
	var peerKey sockopsSockKey
	mirrorKey(&key, &peerKey)
	peer, ok := reports[peerKey]
	if !ok || !lowerOfPair(key) || r.Unread != 0 || peer.Unread != 0 || r.Mode != modePass || peer.Mode != modePass {
		return nil
	}
	return []sockopsSockKey{key, peerKey}
}

// WarnAbout logs what a check did that needs people's attention: its error,
// and connections it aborted.
func (res CheckResult) WarnAbout(log *zap.Logger, err error) {
	if err != nil {
		log.Warn("checking the accelerated sockets", zap.Error(err))
	}
	if res.Aborted > 0 {
		log.Warn("aborted connections whose reader splices(2): it can't read what is redirected to it; "+
			"their server ports stay on TCP from now on (see docs/correctness.md)",
			zap.Int("connections", res.Aborted))
	}
}

// Run checks every interval (0 means DefaultCheckInterval) until ctx is
// done, and tells report what each check did. It closes the Maintainer when
// it returns.
func (m *Maintainer) Run(ctx context.Context, interval time.Duration, report func(CheckResult, error)) {
	defer func() { m.Close() }()
	if interval == 0 {
		interval = DefaultCheckInterval
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		report(m.Check())
	}
}

// Close lets go of the maps, the inspector and the namespaces; closing
// twice does nothing.
func (m *Maintainer) Close() error {
	if m.inspector == nil {
		return nil
	}
	m.namespaces.Close()
	closeMaps(m.maps)
	err := m.inspector.Close()
	m.maps, m.sockHashID, m.inspector, m.namespaces = nil, 0, nil, nil
	return err
}

// DefaultMaxBacklog is four times the largest receive buffer TCP gives a
// socket here: a bound of the same order as TCP's, with room for the bursts
// that a reader soon catches up with (those stay redirected).
func DefaultMaxBacklog() (uint64, error) {
	max, err := maxTCPReceiveBuffer()
	return 4 * max, err
}

// maxTCPReceiveBuffer is the last field of net.ipv4.tcp_rmem.
func maxTCPReceiveBuffer() (uint64, error) {
	data, err := os.ReadFile("/proc/sys/net/ipv4/tcp_rmem")
	if err != nil {
		return 0, err
	}
	fields := strings.Fields(string(data))
	if len(fields) != 3 {
		return 0, errors.New("unexpected net.ipv4.tcp_rmem: " + string(data))
	}
	return strconv.ParseUint(fields[2], 10, 64)
}

// mirrorKey is the key of the other socket of k's connection, as
// mirror_key in bpf/sockredir.h makes it.
func mirrorKey(k, m *sockopsSockKey) {
	*m = sockopsSockKey{
		Netns: k.Netns, LocalIp: k.RemoteIp, RemoteIp: k.LocalIp,
		LocalPort: k.RemotePort, RemotePort: k.LocalPort,
		LocalSeq: k.RemoteSeq, RemoteSeq: k.LocalSeq, Family: k.Family,
	}
}

// lowerOfPair reports whether k sorts before the key of its peer, so that
// each pair is handled once.
func lowerOfPair(k sockopsSockKey) bool {
	if c := cmp.Compare(k.LocalSeq, k.RemoteSeq); c != 0 {
		return c < 0
	}
	if c := cmp.Compare(k.LocalPort, k.RemotePort); c != 0 {
		return c < 0
	}
	return slices.Compare(k.LocalIp[:], k.RemoteIp[:]) < 0
}
