package doctor

import (
	"fmt"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/datapath"
)

func TestParseRelease(t *testing.T) {
	for release, want := range map[string][2]int{
		"6.18.44-fc-v782":      {6, 18},
		"6.1.0-28-cloud-amd64": {6, 1},
		"6.12+deb13-amd64":     {6, 12},
	} {
		major, minor, ok := parseRelease(release)
		if !ok || major != want[0] || minor != want[1] {
			t.Errorf("%s: %d.%d (%v), want %d.%d", release, major, minor, ok, want[0], want[1])
		}
	}
	if _, _, ok := parseRelease("garbage"); ok {
		t.Error("garbage parsed")
	}
}

func TestKernelVersionCheck(t *testing.T) {
	for release, want := range map[string]Status{
		"6.1.0-28-cloud-amd64": Pass,
		"6.18.44":              Pass,
		"7.0.1":                Pass,
		"5.15.0-91-generic":    Fail,
		"nonsense":             Unknown,
	} {
		if got := checkKernelVersion(release).Status; got != want {
			t.Errorf("%s: %s, want %s", release, got, want)
		}
	}
}

func TestParseKernelConfig(t *testing.T) {
	config, err := parseKernelConfig(strings.NewReader("# comment\nCONFIG_BPF_SYSCALL=y\n# CONFIG_BPF_LSM is not set\nCONFIG_HZ=250\n"))
	if err != nil {
		t.Fatal(err)
	}
	if config["CONFIG_BPF_SYSCALL"] != "y" || config["CONFIG_HZ"] != "250" || config["CONFIG_BPF_LSM"] != "" {
		t.Errorf("parsed %v", config)
	}
}

func TestSysctlOutcomes(t *testing.T) {
	c := checkSysctl("missing", "/nonexistent/sysctl", nil)
	if c.Status != Unknown || c.Name != "missing" {
		t.Errorf("a missing sysctl: %+v", c)
	}
}

func TestReportText(t *testing.T) {
	r := Report{OK: false, Checks: []Check{
		{Name: "kernel version", Status: Pass, Detail: "6.18"},
		{Name: "BTF", Status: Fail, Detail: "missing", Remedy: "rebuild"},
	}}
	var b strings.Builder
	if err := r.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"PASS  kernel version", "FAIL  BTF", "-> rebuild", "cannot work on this host"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("no %q in:\n%s", want, b.String())
		}
	}
}

// A probe refused for want of privileges says so; it doesn't blame the kernel.
func TestRequirementOutcomes(t *testing.T) {
	for _, tc := range []struct {
		err    error
		status Status
		remedy string
	}{
		{nil, Pass, ""},
		{fmt.Errorf("detect support for SockHash: %w", unix.EPERM), Unknown, datapath.ErrPrivileges.Error()},
		{fmt.Errorf("detect support for SockHash: %w", ebpf.ErrNotSupported), Fail, "a kernel with sockhash maps"},
	} {
		c := checkRequirement(datapath.KernelRequirement{What: "sockhash maps", Check: func() error { return tc.err }})
		if c.Status != tc.status || c.Remedy != tc.remedy {
			t.Errorf("probe error %v: %s, remedy %q; want %s, %q", tc.err, c.Status, c.Remedy, tc.status, tc.remedy)
		}
	}
}
