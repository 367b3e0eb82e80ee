package datapath

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"go.uber.org/zap"
)

// attachGuards attaches the BPF LSM programs of bpf/guard.c that this kernel
// needs, replacing older ones: the splice guard everywhere, the FIONREAD
// guard where FIONREAD ignores redirected bytes. Kernels without BPF LSM, or
// that refuse trampoline programs, can't have them: that is logged, and
// `status` says so, but it doesn't stop `up`.
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
		log.Warn("this kernel refuses the BPF LSM guards: splice(2) readers of accelerated sockets "+
			"are not protected (see docs/correctness.md)", zap.Error(verifierError(err)))
		return nil
	}
	defer objs.Close()
	if err := attachLSM(p, pinGuardLink, objs.SockredirSpliceGuard); err != nil {
		log.Warn("splice(2) readers of accelerated sockets are not protected: "+
			"the splice guard could not be attached (see docs/correctness.md)", zap.Error(err))
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

// attachLSM attaches prog and pins its link as name; an older link there goes
// only once the new one is in place.
func attachLSM(p pins, name string, prog *ebpf.Program) error {
	l, err := link.AttachLSM(link.LSMOptions{Program: prog})
	if err != nil {
		return err
	}
	defer l.Close()
	if err := os.Remove(p.path(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return l.Pin(p.path(name))
}
