// Package doctor is `sockredir doctor`: it checks whether this host can run
// sockredir, changing nothing, and says for each problem what to do.
package doctor

import (
	"bufio"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/hostfs"
	"github.com/sockredir/sockredir/pkg/localaddr"
)

// Status is a check's outcome. Only Fail means sockredir can't work here.
type Status string

const (
	Pass    Status = "pass"
	Warn    Status = "warn"
	Fail    Status = "fail"
	Unknown Status = "unknown"
)

// Check is one thing looked at.
type Check struct {
	Name   string `json:"name"`
	Status Status `json:"status"`
	Detail string `json:"detail"`
	Remedy string `json:"remedy,omitempty"`
}

// Report is every check, and whether sockredir can work here.
type Report struct {
	OK     bool    `json:"ok"`
	Checks []Check `json:"checks"`
}

// Options say which cgroup and pin directory `up` would use.
type Options struct {
	Cgroup string // empty means the root of the cgroup v2 hierarchy
	PinDir string // empty means datapath.DefaultPinDir
}

// minKernel is the oldest kernel sockredir is tested on.
var minKernel = [2]int{6, 1}

// Run runs every check.
func Run(opts Options) Report {
	if opts.PinDir == "" {
		opts.PinDir = datapath.DefaultPinDir
	}
	var r Report
	add := func(c ...Check) { r.Checks = append(r.Checks, c...) }

	release := kernelRelease()
	add(checkKernelVersion(release))
	add(checkKernelConfig(release)...)
	for _, need := range datapath.KernelRequirements {
		add(checkRequirement(need))
	}
	add(checkBTF())
	privileged := datapath.CheckPrivileges() == nil
	add(checkPrivileges(privileged))
	cgroupCheck, cgroup := checkCgroup(opts.Cgroup)
	add(cgroupCheck)
	add(checkBPFFS(opts.PinDir))
	add(checkSysctl("BPF JIT", "/proc/sys/net/core/bpf_jit_enable", map[string]Check{
		"1": {Status: Pass, Detail: "on"},
		"2": {Status: Warn, Detail: "on, with debug output to the kernel log", Remedy: "sysctl -w net.core.bpf_jit_enable=1"},
		"0": {Status: Warn, Detail: "off: BPF programs run in the interpreter, which is slower", Remedy: "sysctl -w net.core.bpf_jit_enable=1"},
	}))
	add(checkSysctl("kernel.bpf_stats_enabled", "/proc/sys/kernel/bpf_stats_enabled", map[string]Check{
		"0": {Status: Pass, Detail: "off"},
		"1": {Status: Warn, Detail: "on: every BPF program run also takes timestamps, which slows the datapath down",
			Remedy: "sysctl -w kernel.bpf_stats_enabled=0 (certainly while benchmarking)"},
	}))
	if privileged {
		// As every loader does; without it the probes below could fail
		// for want of locked memory on kernels before 5.11.
		if err := rlimit.RemoveMemlock(); err != nil {
			add(Check{Name: "locked memory", Status: Fail, Detail: err.Error(), Remedy: "raise RLIMIT_MEMLOCK (ulimit -l unlimited)"})
		}
	}
	if !privileged {
		add(Check{Name: "kernel behaviour", Status: Unknown, Detail: "not measured: needs the privileges above"})
	} else {
		add(checkKernelRules())
		add(checkSpliceGuard())
		if cgroup != "" {
			add(checkOtherSockOps(cgroup, opts.PinDir))
			add(checkNamespaces(cgroup))
		}
	}

	r.OK = true
	for _, c := range r.Checks {
		if c.Status == Fail {
			r.OK = false
		}
	}
	return r
}

func kernelRelease() string {
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return ""
	}
	return unix.ByteSliceToString(uts.Release[:])
}

func checkKernelVersion(release string) Check {
	c := Check{Name: "kernel version", Detail: release}
	major, minor, ok := parseRelease(release)
	switch {
	case !ok:
		c.Status, c.Detail = Unknown, fmt.Sprintf("cannot read the version from %q", release)
	case major > minKernel[0] || (major == minKernel[0] && minor >= minKernel[1]):
		c.Status = Pass
	default:
		c.Status = Fail
		c.Remedy = fmt.Sprintf("sockredir needs Linux %d.%d or newer", minKernel[0], minKernel[1])
	}
	return c
}

// parseRelease reads "6.18.44-foo" as 6 and 18.
func parseRelease(release string) (major, minor int, ok bool) {
	fields := strings.SplitN(release, ".", 3)
	if len(fields) < 2 {
		return 0, 0, false
	}
	major, err1 := strconv.Atoi(fields[0])
	digits := fields[1] // "18", or "12+deb13-amd64"
	if end := strings.IndexFunc(digits, func(r rune) bool { return r < '0' || r > '9' }); end >= 0 {
		digits = digits[:end]
	}
	minor, err2 := strconv.Atoi(digits)
	return major, minor, err1 == nil && err2 == nil
}

// configOptions are the kernel build options sockredir depends on: a
// missing one fails, except those that only cost a feature or speed.
var configOptions = []struct {
	name     string
	why      string
	optional bool
}{
	{"CONFIG_BPF_SYSCALL", "BPF itself", false},
	{"CONFIG_CGROUP_BPF", "sock_ops programs on cgroups", false},
	{"CONFIG_BPF_STREAM_PARSER", "sockmap and sk_msg programs", false},
	{"CONFIG_DEBUG_INFO_BTF", "BTF, which the programs are relocated with", false},
	{"CONFIG_BPF_JIT", "compiled BPF programs (otherwise interpreted, slower)", true},
	{"CONFIG_BPF_LSM", "the splice guard, which protects splice readers", true},
}

func checkKernelConfig(release string) []Check {
	config, source, err := readKernelConfig(release)
	if err != nil {
		return []Check{{Name: "kernel config", Status: Unknown, Detail: err.Error()}}
	}
	var checks []Check
	for _, opt := range configOptions {
		c := Check{Name: opt.name, Detail: fmt.Sprintf("%s (%s): %s", valueOr(config[opt.name], "not set"), source, opt.why)}
		switch {
		case config[opt.name] == "y":
			c.Status = Pass
		case opt.optional:
			c.Status, c.Remedy = Warn, fmt.Sprintf("a kernel built with %s=y", opt.name)
		default:
			c.Status, c.Remedy = Fail, fmt.Sprintf("a kernel built with %s=y", opt.name)
		}
		checks = append(checks, c)
	}
	return checks
}

func valueOr(v, otherwise string) string {
	if v == "" {
		return otherwise
	}
	return v
}

// readKernelConfig reads /proc/config.gz, or else /boot/config-RELEASE.
func readKernelConfig(release string) (map[string]string, string, error) {
	if f, err := os.Open("/proc/config.gz"); err == nil {
		defer f.Close()
		gz, err := gzip.NewReader(f)
		if err != nil {
			return nil, "", fmt.Errorf("reading /proc/config.gz: %w", err)
		}
		config, err := parseKernelConfig(gz)
		return config, "/proc/config.gz", err
	}
	path := "/boot/config-" + release
	f, err := os.Open(path)
	if err != nil {
		return nil, "", fmt.Errorf("unknown: neither /proc/config.gz nor %s is there", path)
	}
	defer f.Close()
	config, err := parseKernelConfig(f)
	return config, path, err
}

// parseKernelConfig reads the NAME=VALUE lines of a kernel .config.
func parseKernelConfig(r io.Reader) (map[string]string, error) {
	config := map[string]string{}
	s := bufio.NewScanner(r)
	for s.Scan() {
		if name, value, ok := strings.Cut(s.Text(), "="); ok && strings.HasPrefix(name, "CONFIG_") {
			config[name] = value
		}
	}
	return config, s.Err()
}

func checkRequirement(need datapath.KernelRequirement) Check {
	c := Check{Name: need.What, Status: Pass, Detail: "supported"}
	switch err := need.Probe(); {
	case errors.Is(err, datapath.ErrPrivileges):
		c.Status, c.Detail = Unknown, "not probed: the kernel did not permit it"
		c.Remedy = datapath.ErrPrivileges.Error()
	case err != nil:
		c.Status, c.Detail, c.Remedy = Fail, err.Error(), "a kernel with "+need.What
	}
	return c
}

func checkBTF() Check {
	c := Check{Name: "BTF", Status: Pass, Detail: "/sys/kernel/btf/vmlinux"}
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
		c.Status, c.Detail = Fail, err.Error()
		c.Remedy = "a kernel built with CONFIG_DEBUG_INFO_BTF=y: the programs read kernel structures through BTF"
	}
	return c
}

func checkPrivileges(privileged bool) Check {
	if privileged {
		return Check{Name: "privileges", Status: Pass, Detail: "may load and attach BPF programs"}
	}
	return Check{Name: "privileges", Status: Fail, Detail: "may not load BPF programs", Remedy: datapath.ErrPrivileges.Error()}
}

// checkCgroup checks the cgroup v2 mount and the target cgroup, and
// returns the target cgroup if it is usable.
func checkCgroup(cgroup string) (Check, string) {
	c := Check{Name: "cgroup v2"}
	root, err := hostfs.CgroupV2Mount()
	if err != nil {
		c.Status, c.Detail, c.Remedy = Fail, "not mounted", err.Error()
		return c, ""
	}
	if cgroup == "" {
		cgroup = root
	}
	if err := hostfs.CheckCgroup(cgroup); err != nil {
		c.Status, c.Detail, c.Remedy = Fail, fmt.Sprintf("mounted at %s", root), err.Error()
		return c, ""
	}
	c.Status, c.Detail = Pass, fmt.Sprintf("mounted at %s; target cgroup %s", root, cgroup)
	return c, cgroup
}

func checkBPFFS(pinDir string) Check {
	c := Check{Name: "BPF filesystem"}
	on, err := hostfs.OnBPFFS(pinDir)
	switch {
	case err != nil:
		c.Status, c.Detail = Unknown, err.Error()
	case on:
		c.Status, c.Detail = Pass, fmt.Sprintf("pin directory %s is on one", pinDir)
	case strings.HasPrefix(pinDir, hostfs.DefaultBPFFS+"/"):
		c.Status = Warn
		c.Detail = fmt.Sprintf("none mounted at %s: `up` mounts one, which lasts until reboot", hostfs.DefaultBPFFS)
		c.Remedy = "mount it at boot (systemd does by default); in a container, mount the host's /sys/fs/bpf"
	default:
		c.Status, c.Detail = Fail, fmt.Sprintf("pin directory %s is not on a BPF filesystem", pinDir)
		c.Remedy = fmt.Sprintf("choose one under %s, or mount one with `mount -t bpf bpf DIR`", hostfs.DefaultBPFFS)
	}
	return c
}

// checkSysctl reads a one-number sysctl and reports the outcome given for
// its value.
func checkSysctl(name, path string, outcomes map[string]Check) Check {
	data, err := os.ReadFile(path)
	if err != nil {
		return Check{Name: name, Status: Unknown, Detail: err.Error()}
	}
	value := strings.TrimSpace(string(data))
	c, ok := outcomes[value]
	if !ok {
		c = Check{Status: Unknown, Detail: "unexpected value " + value}
	}
	c.Name = name
	return c
}

func checkKernelRules() Check {
	c := Check{Name: "FIONREAD"}
	rules, err := datapath.ProbeKernel()
	switch {
	case err != nil:
		c.Status, c.Detail = Unknown, fmt.Sprintf("could not be measured: %v", err)
	case !rules.FIONREADCountsRedirected:
		c.Status = Warn
		c.Detail = "ignores redirected bytes on this kernel. Where BPF LSM programs load (see the splice guard), sockredir's FIONREAD guard " +
			"puts a socket that asks on TCP from then on, and later connections to its server port from the start. " +
			"A port's probation (the default) catches applications that ask at once; one that asks first only " +
			"after its port was accelerated misses the bytes redirected before it"
		c.Remedy = "a kernel whose tcp_bpf answers FIONREAD (docs/kernels.md), or exclude the ports of applications that use FIONREAD in the policy"
	case !rules.FIONREADCountsTCP:
		c.Status = Warn
		c.Detail = "ignores TCP bytes of sockets in a sockmap on this kernel (929e30f93125 without 04af4efde58a); " +
			"sockredir inserts only paired sockets, whose bytes are redirected; only a socket that refused redirected bytes " +
			"(SO_RCVLOWAT) gets TCP bytes while in the map"
	default:
		c.Status, c.Detail = Pass, "counts redirected and TCP bytes"
	}
	return c
}

// checkSpliceGuard loads and attaches an empty BPF LSM program for a
// moment, as `up` does with the splice guard.
func checkSpliceGuard() Check {
	c := Check{Name: "splice guard (BPF LSM)", Status: Pass, Detail: "BPF LSM programs can be attached"}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.LSM,
		AttachType:   ebpf.AttachLSMMac,
		AttachTo:     "file_permission",
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err == nil {
		var l link.Link
		if l, err = link.AttachLSM(link.LSMOptions{Program: prog}); err == nil {
			l.Close()
		}
		prog.Close()
	}
	if err != nil {
		c.Status = Warn
		c.Detail = fmt.Sprintf("refused (%v): applications that read accelerated sockets with splice "+
			"(Go's io.Copy between TCP connections, haproxy, ztunnel, io_uring's splice) can't read the redirected bytes. "+
			"The splice watch keeps a port on TCP once it has seen a splice there, and a port's probation (the default) "+
			"sees the applications that splice from the start; a connection that starts to splice once its port is "+
			"accelerated (haproxy splice-auto) loses what is redirected to it", err)
		c.Remedy = "boot with bpf in the lsm= list (cat /sys/kernel/security/lsm) on a kernel that allows trampoline programs; " +
			"until then, exclude the ports of applications that splice only sometimes (redirect.exclude_ports)"
	}
	return c
}

// checkOtherSockOps lists the sock_ops programs that run for the cgroup,
// inherited ones included, besides sockredir's own.
func checkOtherSockOps(cgroup, pinDir string) Check {
	c := Check{Name: "other sock_ops programs"}
	f, err := os.Open(cgroup)
	if err != nil {
		c.Status, c.Detail = Unknown, err.Error()
		return c
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachCGroupSockOps, QueryFlags: unix.BPF_F_QUERY_EFFECTIVE})
	if err != nil {
		c.Status, c.Detail = Unknown, err.Error()
		return c
	}
	own := ownProgramIDs(pinDir)
	var others []string
	for _, p := range res.Programs {
		if own[p.ID] {
			continue
		}
		name := "?"
		if prog, err := ebpf.NewProgramFromID(p.ID); err == nil {
			if info, err := prog.Info(); err == nil {
				name = info.Name
			}
			prog.Close()
		}
		others = append(others, fmt.Sprintf("%s (id %d)", name, p.ID))
	}
	if len(others) == 0 {
		c.Status, c.Detail = Pass, "none besides sockredir's"
		return c
	}
	c.Status = Warn
	c.Detail = fmt.Sprintf("%s run for %s too: a socket another tool already put in its own sockmap can't join sockredir's, "+
		"and that connection stays on TCP (add failures)", strings.Join(others, ", "), cgroup)
	c.Remedy = "make sure only one socket-acceleration tool (Cilium sockops, Merbridge, ...) covers a cgroup"
	return c
}

// ownProgramIDs are the programs of a sockredir datapath pinned in pinDir.
func ownProgramIDs(pinDir string) map[ebpf.ProgramID]bool {
	own := map[ebpf.ProgramID]bool{}
	if on, err := hostfs.OnBPFFS(pinDir); err != nil || !on {
		return own // ReadStatus would mount a BPF filesystem
	}
	st, err := datapath.ReadStatus(pinDir)
	if err != nil {
		return own
	}
	for _, p := range st.Programs {
		own[ebpf.ProgramID(p.ID)] = true
	}
	return own
}

func checkNamespaces(cgroup string) Check {
	c := Check{Name: "local addresses"}
	addrs, err := localaddr.OfCgroup(cgroup)
	if err != nil {
		c.Status, c.Detail = Fail, err.Error()
		c.Remedy = "run as root, with CAP_SYS_ADMIN and CAP_SYS_PTRACE (to enter the cgroup's network namespaces), in the host's PID namespace"
		return c
	}
	c.Status, c.Detail = Pass, fmt.Sprintf("%d addresses count as local (this network namespace and those of the cgroup's processes)", len(addrs))
	return c
}

// WriteText prints the report for people: one line per check, and the
// remedy below a check that did not pass.
func (r Report) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, c := range r.Checks {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", strings.ToUpper(string(c.Status)), c.Name, c.Detail)
		if c.Remedy != "" && c.Status != Pass {
			fmt.Fprintf(tw, "\t\t-> %s\n", c.Remedy)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	verdict := "sockredir can accelerate connections on this host"
	if !r.OK {
		verdict = "sockredir cannot work on this host until the failed checks are fixed"
	}
	_, err := fmt.Fprintln(w, verdict)
	return err
}

// ErrChecksFailed is what `sockredir doctor` exits with when a check failed.
var ErrChecksFailed = errors.New("some checks failed: see the remedies above")
