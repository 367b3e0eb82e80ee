package datapath

import (
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
	Key    sockopsSockKey
	Unread uint32 // 1 if redirected bytes are still queued
	_      uint32
}

// inspectSockets reports on sockredir's sockets in every network namespace
// that this process or a process of the cgroup is in (an iter/tcp iterator
// sees the namespace that opens it). Sockets are reported by their own key.
// A socket whose connection TCP has finished closing (both sides shut down)
// has left the TCP hash tables, so no iterator sees it, while its
// application may still have redirected bytes to read: callers must treat
// an unreported socket as possibly holding data.
func inspectSockets(maps map[string]*ebpf.Map, cgroup string) (map[sockopsSockKey]socketReport, error) {
	spec, err := loadInspect()
	if err != nil {
		return nil, err
	}
	var objs inspectObjects
	if err := loadWithMaps(spec, &objs, maps); err != nil {
		return nil, fmt.Errorf("loading the socket inspector: %w", verifierError(err))
	}
	defer objs.Close()
	it, err := link.AttachIter(link.IterOptions{Program: objs.SockredirInspect})
	if err != nil {
		return nil, fmt.Errorf("attaching the socket inspector: %w", err)
	}
	defer it.Close()

	namespaces, err := localaddr.CgroupNamespaces(cgroup)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, ns := range namespaces {
			ns.Close()
		}
	}()
	reports := make(map[sockopsSockKey]socketReport)
	for _, ns := range namespaces {
		if err := readIterIn(ns, it, reports); err != nil {
			return nil, err
		}
	}
	return reports, nil
}

// readIterIn reads the iterator opened in network namespace ns. It runs on a
// thread of its own that is thrown away afterwards, so no other goroutine
// ever runs in ns.
func readIterIn(ns netns.NsHandle, it *link.Iter, into map[sockopsSockKey]socketReport) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		if err := netns.Set(ns); err != nil {
			done <- fmt.Errorf("entering a network namespace: %w", err)
			return
		}
		rd, err := it.Open()
		if err != nil {
			done <- err
			return
		}
		defer rd.Close()
		for {
			var r socketReport
			err := binary.Read(rd, binary.NativeEndian, &r)
			if errors.Is(err, io.EOF) {
				done <- nil
				return
			}
			if err != nil {
				done <- fmt.Errorf("reading the socket inspector: %w", err)
				return
			}
			into[r.Key] = r
		}
	}()
	return <-done
}
