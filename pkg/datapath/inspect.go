package datapath

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netns"

	"github.com/sockredir/sockredir/pkg/localaddr"
)

// socketReport is one of sockredir's sockets, as the iter/tcp program
// reports it: struct socket_report in bpf/inspect.c.
type socketReport struct {
	Key     sockopsSockKey
	Unread  uint64 // redirected bytes still queued; at least 1 if any
	Mode    uint32 // how the socket sends: enum redirect_mode
	Refused uint32 // why it refused redirected bytes (enum refusal), 0 if it didn't
}

// inspectSockets reports on sockredir's sockets in every network namespace
// that this process or a process of the cgroup is in (an iter/tcp iterator
// sees the namespace that opens it). Sockets are reported by their own key.
// A socket whose connection TCP has finished closing (both sides shut down)
// has left the TCP hash tables, so no iterator sees it, while its
// application may still have redirected bytes to read: callers must treat
// an unreported socket as possibly holding data.
func inspectSockets(maps map[string]*ebpf.Map, cgroup string) (map[sockopsSockKey]socketReport, error) {
	in, err := newInspector(maps, 0)
	if err != nil {
		return nil, err
	}
	defer in.Close()
	namespaces, err := localaddr.CgroupNamespaces(cgroup)
	if err != nil {
		return nil, err
	}
	defer closeNamespaces(namespaces)
	return in.inspect(namespaces)
}

// inspector is the loaded iter/tcp program of bpf/inspect.c.
type inspector struct {
	objs inspectObjects
	iter *link.Iter
}

// newInspector loads the inspector. With a maxBacklog above 0, each run also
// puts the connection of every socket with more redirected bytes waiting
// than that back on TCP.
func newInspector(maps map[string]*ebpf.Map, maxBacklog uint64) (*inspector, error) {
	spec, err := loadInspect()
	if err != nil {
		return nil, err
	}
	if err := spec.Variables["max_backlog"].Set(maxBacklog); err != nil {
		return nil, fmt.Errorf("setting the backlog limit: %w", err)
	}
	in := &inspector{}
	if err := loadWithMaps(spec, &in.objs, maps); err != nil {
		return nil, fmt.Errorf("loading the socket inspector: %w", verifierError(err))
	}
	if in.iter, err = link.AttachIter(link.IterOptions{Program: in.objs.SockredirInspect}); err != nil {
		in.objs.Close()
		return nil, fmt.Errorf("attaching the socket inspector: %w", err)
	}
	return in, nil
}

// inspect runs the inspector in each of the namespaces.
func (in *inspector) inspect(namespaces []netns.NsHandle) (map[sockopsSockKey]socketReport, error) {
	own, err := localaddr.OwnNamespace()
	if err != nil {
		return nil, err
	}
	defer own.Close()
	reports := make(map[sockopsSockKey]socketReport)
	for _, ns := range namespaces {
		if err := readIterIn(ns, own, in.iter, reports); err != nil {
			return nil, err
		}
	}
	return reports, nil
}

func (in *inspector) Close() error {
	return errors.Join(in.iter.Close(), in.objs.Close())
}

func closeNamespaces(namespaces []netns.NsHandle) {
	for _, ns := range namespaces {
		ns.Close()
	}
}

// readIterIn reads the iterator in network namespace ns, own being this
// process's.
func readIterIn(ns, own netns.NsHandle, it *link.Iter, into map[sockopsSockKey]socketReport) error {
	rd, err := openIterIn(ns, own, it)
	if err != nil {
		return err
	}
	defer rd.Close()
	buffered := bufio.NewReaderSize(rd, 64<<10) // one read(2) for many sockets
	for {
		var r socketReport
		err := binary.Read(buffered, binary.NativeEndian, &r)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading the socket inspector: %w", err)
		}
		into[r.Key] = r
	}
}

// openIterIn opens the iterator in ns. An iterator walks the namespace it
// was opened in, so a thread enters ns only for the open and comes back.
// The thread is thrown away (it exits with its goroutine) only if it can't
// come back; the Go runtime never ends the main thread, which would
// otherwise stay parked in ns, holding it, as the namespace of this process.
func openIterIn(ns, own netns.NsHandle, it *link.Iter) (io.ReadCloser, error) {
	if ns.Equal(own) {
		return it.Open()
	}
	type opened struct {
		rd  io.ReadCloser
		err error
	}
	done := make(chan opened, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread() // setns changes nothing when it fails
			done <- opened{err: fmt.Errorf("entering a network namespace: %w", err)}
			return
		}
		rd, err := it.Open()
		if netns.Set(own) == nil {
			runtime.UnlockOSThread()
		}
		done <- opened{rd, err}
	}()
	o := <-done
	return o.rd, o.err
}
