package datapath

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"

	"github.com/sockredir/sockredir/pkg/localaddr"
)

// tcp_bpf queues redirected bytes at the receiver without limit: a reader
// that falls behind would let them pile up until the host runs out of TCP
// memory, and the sender would then get ENOMEM. A BacklogLimiter gives such
// connections TCP's flow control back. Each Check makes every accelerated
// socket with more than MaxBacklog redirected bytes waiting refuse
// redirected bytes; its peer then sends over TCP, which the receive window
// holds back, and the reader gets the redirected bytes first, so nothing is
// reordered. The bound holds between checks only: what arrives in between
// adds to it.

// namespaceRefresh is how often a BacklogLimiter looks for network
// namespaces that came or went in the cgroup.
const namespaceRefresh = time.Second

// BacklogLimiter checks the datapath pinned in a directory. It is not safe
// for concurrent use.
type BacklogLimiter struct {
	// MaxBacklog is the most redirected bytes a socket may have waiting.
	MaxBacklog uint64

	cgroup     string
	maps       map[string]*ebpf.Map
	inspector  *inspector
	namespaces []netns.NsHandle
	listed     time.Time
}

// NewBacklogLimiter prepares checks of the datapath pinned in pinDir
// (DefaultPinDir if empty); maxBacklog 0 means MaxTCPReceiveBuffer.
func NewBacklogLimiter(pinDir string, maxBacklog uint64) (*BacklogLimiter, error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	if maxBacklog == 0 {
		var err error
		if maxBacklog, err = MaxTCPReceiveBuffer(); err != nil {
			return nil, err
		}
	}
	p := pins(pinDir)
	meta, err := p.meta()
	if err != nil {
		return nil, err
	}
	if meta == nil {
		return nil, fmt.Errorf("nothing is up in %s", pinDir)
	}
	if err := meta.checkABI(pinDir); err != nil {
		return nil, err
	}
	maps, err := p.loadMaps()
	if err != nil {
		return nil, err
	}
	in, err := newInspector(maps, maxBacklog)
	if err != nil {
		closeMaps(maps)
		return nil, err
	}
	return &BacklogLimiter{MaxBacklog: maxBacklog, cgroup: meta.cgroup(), maps: maps, inspector: in}, nil
}

// Check runs once over the cgroup's sockets and reports how many were over
// the limit.
func (b *BacklogLimiter) Check() (int, error) {
	if time.Since(b.listed) > namespaceRefresh {
		namespaces, err := localaddr.CgroupNamespaces(b.cgroup)
		if err != nil {
			return 0, err
		}
		closeNamespaces(b.namespaces)
		b.namespaces, b.listed = namespaces, time.Now()
	}
	reports, err := b.inspector.inspect(b.namespaces)
	if err != nil {
		return 0, err
	}
	over := 0
	for _, r := range reports {
		if r.Unread > b.MaxBacklog {
			over++
		}
	}
	return over, nil
}

func (b *BacklogLimiter) Close() error {
	closeNamespaces(b.namespaces)
	closeMaps(b.maps)
	return b.inspector.Close()
}

// MaxTCPReceiveBuffer is the largest receive buffer TCP gives a socket here
// (the last field of net.ipv4.tcp_rmem): a backlog that size is one TCP
// would allow too.
func MaxTCPReceiveBuffer() (uint64, error) {
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
