package datapath

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"go.uber.org/zap"

	"github.com/sockredir/sockredir/pkg/hostfs"
)

// attachGuards attaches the BPF LSM programs of bpf/guard.c that this kernel
// needs, replacing older ones: the splice guard everywhere, the FIONREAD
// guard where FIONREAD ignores redirected bytes. Kernels without BPF LSM, or
// that refuse trampoline programs, can't have them: they get the splice
// watch instead. That is logged, and `status` says so, but it doesn't stop
// `up`.
func attachGuards(p pins, maps map[string]*ebpf.Map, log *zap.Logger) error {
	rules, err := ProbeKernel()
	if err != nil {
		return fmt.Errorf("probing the kernel: %w", err)
	}
	spec, err := loadGuard()
	if err != nil {
		return err
	}
	var objs guardObjects
	if err := loadWithMaps(spec, &objs, maps); err != nil {
		log.Warn("this kernel refuses the BPF LSM guards", zap.Error(verifierError(err)))
		watchSplice(p, maps, log)
		return nil
	}
	defer objs.Close()
	if err := attachLSM(p, pinGuardLink, objs.SockredirSpliceGuard); err != nil {
		log.Warn("the splice guard could not be attached", zap.Error(err))
		watchSplice(p, maps, log)
	}
	if rules.FIONREADCountsRedirected {
		return nil
	}
	if err := attachLSM(p, pinFIONREADLink, objs.SockredirFionreadGuard); err != nil {
		log.Warn("FIONREAD ignores redirected bytes on this kernel, and the FIONREAD guard "+
			"could not be attached (see docs/kernels.md)", zap.Error(err))
	}
	return nil
}

// watchSplice attaches the splice watch (bpf/splicewatch.c) where the
// splice guard can't be: once a socket splices, its server port's next
// connections stay on TCP. A probation connection is on TCP already; an
// accelerated one can't be saved, and the upkeep (daemon, run) aborts it.
func watchSplice(p pins, maps map[string]*ebpf.Map, log *zap.Logger) {
	if err := attachSpliceWatch(p, maps); err != nil {
		log.Warn("splice readers of accelerated sockets are not protected: "+
			"the splice watch could not be attached either (see docs/correctness.md)", zap.Error(err))
		return
	}
	log.Warn("splice readers (splice(2), sendfile(2), io_uring) are only watched on this kernel: a port whose probation connections splice stays " +
		"on TCP, but a connection that starts to splice once its port is accelerated loses what is redirected to it " +
		"(the daemon aborts it after a second); exclude ports that splice only sometimes (see docs/correctness.md)")
}

// attachSpliceWatch loads the watch for this datapath's sock_hash, which it
// finds sockets of by the map's id, and pins its tracepoint links.
func attachSpliceWatch(p pins, maps map[string]*ebpf.Map) error {
	if err := hostfs.EnsureTracefs(); err != nil {
		return err
	}
	spec, err := loadSplicewatch()
	if err != nil {
		return err
	}
	id, err := mapID(maps["sock_hash"])
	if err != nil {
		return err
	}
	if err := spec.Variables["sock_hash_id"].Set(uint32(id)); err != nil {
		return err
	}
	var objs splicewatchObjects
	if err := loadWithMaps(spec, &objs, maps); err != nil {
		return verifierError(err)
	}
	defer objs.Close()
	watches := []struct {
		pin, event string
		attach     func() (link.Link, error)
		link       link.Link
	}{
		{pin: pinSpliceWatchLink, event: "syscalls:sys_enter_splice", attach: func() (link.Link, error) {
			return link.Tracepoint("syscalls", "sys_enter_splice", objs.SockredirSpliceWatch, nil)
		}},
		{pin: pinSendfileWatchLink, event: "syscalls:sys_enter_sendfile64", attach: func() (link.Link, error) {
			return link.Tracepoint("syscalls", "sys_enter_sendfile64", objs.SockredirSendfileWatch, nil)
		}},
		{pin: pinIoUringSpliceWatchLink, event: "io_uring's submissions", attach: func() (link.Link, error) {
			return attachIoUringSubmissions(objs.SockredirIoUringSpliceWatch)
		}},
	}
	// All attach before any is pinned: part of a watch must not look like
	// one in `status`.
	for i := range watches {
		w := &watches[i]
		if w.link, err = w.attach(); err != nil {
			for _, attached := range watches[:i] {
				if attached.link != nil {
					attached.link.Close()
				}
			}
			return fmt.Errorf("attaching to %s: %w", w.event, err)
		}
	}
	var errs []error
	for _, w := range watches {
		if w.link != nil {
			errs = append(errs, pinReplacing(p, w.pin, w.link))
		}
	}
	return errors.Join(errs...)
}

// attachIoUringSubmissions attaches prog to the tracepoint of every
// io_uring request's submission, named io_uring_submit_sqe before 6.4; it
// returns no link on a kernel without io_uring.
func attachIoUringSubmissions(prog *ebpf.Program) (link.Link, error) {
	for _, name := range []string{"io_uring_submit_req", "io_uring_submit_sqe"} {
		l, err := link.AttachRawTracepoint(link.RawTracepointOptions{Name: name, Program: prog})
		if !errors.Is(err, os.ErrNotExist) {
			return l, err
		}
	}
	if kernelHas[btf.Struct]("io_kiocb") {
		return nil, errors.New("this kernel has io_uring, but neither of the tracepoints of its submissions that sockredir knows")
	}
	return nil, nil
}

// attachLSM attaches prog and pins its link as name.
func attachLSM(p pins, name string, prog *ebpf.Program) error {
	l, err := link.AttachLSM(link.LSMOptions{Program: prog})
	if err != nil {
		return err
	}
	return pinReplacing(p, name, l)
}

// pinReplacing pins l as name and closes it. The new link is pinned beside
// an older one and then renamed over it, which detaches the older one: a
// guard is attached throughout, and a pin that fails leaves the older one
// at work.
func pinReplacing(p pins, name string, l link.Link) error {
	defer l.Close()
	staged := p.path(name + stagedSuffix)
	if err := os.Remove(staged); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := l.Pin(staged); err != nil {
		return err
	}
	if err := os.Rename(staged, p.path(name)); err != nil {
		return errors.Join(err, l.Unpin())
	}
	return nil
}
