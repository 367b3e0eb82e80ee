package test

import (
	"encoding/json"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/doctor"
	"github.com/sockredir/sockredir/test/harness"
)

func doctorReport(t *testing.T, r cliResult) doctor.Report {
	t.Helper()
	var report doctor.Report
	if err := json.Unmarshal([]byte(r.stdout), &report); err != nil {
		t.Fatalf("doctor --json: %v: %q", err, r.stdout)
	}
	return report
}

func findCheck(report doctor.Report, name string) doctor.Check {
	for _, c := range report.Checks {
		if c.Name == name {
			return c
		}
	}
	return doctor.Check{}
}

// Every host the tests run on can run sockredir, so doctor passes there;
// it notices another sock_ops program on the cgroup, and a user who lacks
// the privileges.
func TestDoctor(t *testing.T) {
	e := harness.New(t)
	args := []string{"doctor", "--cgroup", e.Cgroup, "--pin-dir", e.PinDir}
	r := runCLI(t, nil, append(args, "--json")...)
	report := doctorReport(t, r)
	if r.code != 0 || !report.OK {
		t.Errorf("doctor --json: exit %d, report %+v", r.code, report)
	}
	for _, name := range []string{"kernel version", "BTF", "privileges", "cgroup v2", "BPF filesystem",
		"kernel.bpf_stats_enabled", "BPF JIT", "FIONREAD", "splice guard (BPF LSM)", "other sock_ops programs"} {
		if c := findCheck(report, name); c.Status == "" {
			t.Errorf("no %q check in %+v", name, report.Checks)
		}
	}
	for _, c := range report.Checks {
		if c.Status != doctor.Pass && c.Status != doctor.Warn && c.Status != doctor.Unknown {
			t.Errorf("check %q: %s (%s)", c.Name, c.Status, c.Detail)
		}
	}
	if r := runCLI(t, nil, args...); r.code != 0 || !regexp.MustCompile(`(?m)^PASS +kernel version`).MatchString(r.stdout) {
		t.Errorf("doctor: exit %d:\n%s%s", r.code, r.stdout, r.stderr)
	}

	e.Up(datapath.Config{})
	if c := findCheck(doctorReport(t, runCLI(t, nil, append(args, "--json")...)), "other sock_ops programs"); c.Status != doctor.Pass {
		t.Errorf("sockredir's own program counted as another: %+v", c)
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.SockOps, License: "GPL", Name: "someone_else",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	l, err := link.AttachCgroup(link.CgroupOptions{Path: e.Cgroup, Attach: ebpf.AttachCGroupSockOps, Program: prog})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	r = runCLI(t, nil, append(args, "--json")...)
	if c := findCheck(doctorReport(t, r), "other sock_ops programs"); c.Status != doctor.Warn || !strings.Contains(c.Detail, "someone_else") {
		t.Errorf("another sock_ops program on the cgroup: %+v, want a warning naming it", c)
	}
	if r.code != 0 {
		t.Errorf("a warning must not fail doctor: exit %d", r.code)
	}

	nobody := &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	r = runCLI(t, nobody, append(args, "--json")...)
	if c := findCheck(doctorReport(t, r), "privileges"); r.code != 1 || c.Status != doctor.Fail || c.Remedy == "" {
		t.Errorf("doctor as nobody: exit %d, privileges check %+v: want exit 1 and a failure with a remedy", r.code, c)
	}
}
