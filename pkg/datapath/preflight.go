package datapath

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// ErrPrivileges says that the caller may not load and attach BPF programs.
var ErrPrivileges = errors.New("sockredir needs root (CAP_NET_ADMIN, with CAP_SYS_ADMIN or with CAP_BPF and CAP_PERFMON): run it with sudo")

// preflight checks what every command that touches the kernel needs, so that
// a missing privilege or kernel feature is reported before anything changes.
func preflight() error {
	if err := CheckPrivileges(); err != nil {
		return err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("raising the locked-memory limit for BPF maps: %w", err)
	}
	return checkKernel()
}

// CheckPrivileges returns ErrPrivileges unless this process may load and
// attach the datapath's programs. CAP_NET_ADMIN is needed on every kernel:
// before 6.5, only it lets a process create a sockhash (CAP_SYS_ADMIN
// doesn't).
func CheckPrivileges() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("reading capabilities: %w", err)
	}
	has := func(c int) bool { return data[c/32].Effective&(1<<(c%32)) != 0 }
	if has(unix.CAP_NET_ADMIN) && (has(unix.CAP_SYS_ADMIN) || (has(unix.CAP_BPF) && has(unix.CAP_PERFMON))) {
		return nil
	}
	return ErrPrivileges
}

// KernelRequirement is a kernel feature the datapath is built on.
type KernelRequirement struct {
	What  string
	Check func() error
}

// Probe runs Check. A probe that the kernel did not permit (EPERM) says
// nothing about the kernel: that is reported as ErrPrivileges.
func (need KernelRequirement) Probe() error {
	err := need.Check()
	if errors.Is(err, unix.EPERM) {
		return fmt.Errorf("%w (the kernel did not permit probing %s: %w)", ErrPrivileges, need.What, err)
	}
	return err
}

// KernelRequirements are what every command that loads the datapath checks
// first; `sockredir doctor` reports on each.
var KernelRequirements = []KernelRequirement{
	{"sock_ops programs (CONFIG_CGROUP_BPF)", func() error { return features.HaveProgramType(ebpf.SockOps) }},
	{"sk_msg programs (CONFIG_BPF_STREAM_PARSER)", func() error { return features.HaveProgramType(ebpf.SkMsg) }},
	{"sockhash maps (CONFIG_BPF_STREAM_PARSER)", func() error { return features.HaveMapType(ebpf.SockHash) }},
	{"socket-local storage (CONFIG_BPF_SYSCALL)", func() error { return features.HaveMapType(ebpf.SkStorage) }},
}

// checkKernel reports a kernel that lacks what the datapath is built on. It
// runs once CheckPrivileges has passed, so a probe refused with EPERM means
// that something other than capabilities forbids bpf(2).
func checkKernel() error {
	for _, need := range KernelRequirements {
		switch err := need.Check(); {
		case errors.Is(err, unix.EPERM):
			return fmt.Errorf("the kernel refused to let sockredir probe %s although this process has the capabilities it needs (%w): "+
				"a seccomp profile (a container runtime's default one blocks bpf(2)), a user namespace whose capabilities "+
				"don't count for the host, or lockdown may forbid BPF; run it privileged, in the host's namespaces", need.What, err)
		case err != nil:
			return fmt.Errorf("this kernel has no %s, which sockredir needs: %w", need.What, err)
		}
	}
	return nil
}
