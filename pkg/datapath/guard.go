package datapath

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// attachSpliceGuard attaches the BPF LSM program that turns splice(2) reads
// of sockredir's sockets into EINVAL (bpf/guard.c), replacing an older one.
// It fails on kernels without BPF LSM or that refuse trampoline programs.
func attachSpliceGuard(p pins, maps map[string]*ebpf.Map) error {
	spec, err := loadGuard()
	if err != nil {
		return err
	}
	var objs guardObjects
	if err := loadWithMaps(spec, &objs, maps); err != nil {
		return fmt.Errorf("loading the splice guard: %w", verifierError(err))
	}
	defer objs.Close()
	l, err := link.AttachLSM(link.LSMOptions{Program: objs.SockredirSpliceGuard})
	if err != nil {
		return fmt.Errorf("attaching the splice guard: %w", err)
	}
	defer l.Close()
	// The old guard, if any, goes only once the new one is in place.
	if err := os.Remove(p.path(pinGuardLink)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return l.Pin(p.path(pinGuardLink))
}
