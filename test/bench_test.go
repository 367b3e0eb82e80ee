package test

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sockredir/sockredir/pkg/bench"
	"github.com/sockredir/sockredir/pkg/hostfs"
	"github.com/sockredir/sockredir/test/harness"
)

// benchSmokeArgs run `sockredir bench` in a few seconds: one workload of
// each kind, every configuration, the fewest rounds the CLI allows.
var benchSmokeArgs = []string{"bench", "--rounds", "5", "--duration", "60ms", "--warmup", "20ms",
	"--workloads", `^(rr 64B c=1|crr 64B c=16|stream write 64KiB c=1|stream sendfile 64KiB c=1)$`}

// The whole benchmark, as a user runs it: every run delivers every byte
// along the configuration's path, the report and chart come out, and the
// benchmark's cgroups, namespace and pins are gone afterwards.
func TestBenchSmoke(t *testing.T) {
	harness.RequirePrivileges(t)
	before := leftovers(t, "sockredir-bench-")
	statsBefore := readSysctl(t, "kernel/bpf_stats_enabled")
	chart := filepath.Join(t.TempDir(), "chart.svg")

	r := runCLI(t, nil, append(benchSmokeArgs, "--json", "--chart", chart)...)
	if r.code != 0 {
		t.Fatalf("bench: exit %d: %s\n%s", r.code, r.stderr, r.stdout)
	}
	var rep bench.Report
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("bench --json printed no report: %v\n%s", err, r.stdout)
	}
	if len(rep.Results) != 4 || len(rep.Errors) != 0 {
		t.Fatalf("want 4 workloads and no failed run, got %d workloads and errors %q", len(rep.Results), rep.Errors)
	}
	for _, wr := range rep.Results {
		if len(wr.Configs) != len(bench.AllConfigs) {
			t.Errorf("%s: ran %d configurations, want %d", wr.Name, len(wr.Configs), len(bench.AllConfigs))
		}
		for _, c := range wr.Configs {
			if c.Value.N != 5 || c.Value.Median <= 0 {
				t.Errorf("%s under %s: want 5 measured rounds, got %+v", wr.Name, c.Config, c.Value)
			}
		}
	}
	if len(rep.Targets) == 0 || len(rep.ProgramCosts) == 0 {
		t.Errorf("the report has no targets or program costs: %+v", rep)
	}
	if svg, err := os.ReadFile(chart); err != nil || !bytes.HasPrefix(svg, []byte("<svg")) {
		t.Errorf("no chart at %s: %v", chart, err)
	}
	if got := readSysctl(t, "kernel/bpf_stats_enabled"); got != statsBefore {
		t.Errorf("kernel.bpf_stats_enabled is %s after the benchmark, was %s", got, statsBefore)
	}
	checkNoLeftovers(t, "sockredir-bench-", before)
}

// Ctrl-C in the middle of a run still removes everything the benchmark made.
func TestBenchInterruptCleansUp(t *testing.T) {
	harness.RequirePrivileges(t)
	before := leftovers(t, "sockredir-bench-")
	cmd := exec.Command(sockredirBinary(t), "bench", "--duration", "2s", "--workloads", `^stream write 64KiB c=1$`, "--chart", "")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second) // inside a run: setup takes well under a second
	cmd.Process.Signal(syscall.SIGINT)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("bench did not stop within 30s of SIGINT: %s", stderr.String())
	}
	if cmd.ProcessState.ExitCode() != 1 || !strings.Contains(stderr.String(), "interrupted") {
		t.Errorf("want exit 1 saying it was interrupted, got exit %d: %s", cmd.ProcessState.ExitCode(), stderr.String())
	}
	checkNoLeftovers(t, "sockredir-bench-", before)
}

// leftovers lists the cgroups and pin directories named prefix* that
// exist now: what the benchmark or `sockredir run` makes for itself.
func leftovers(t *testing.T, prefix string) map[string]bool {
	t.Helper()
	root, err := hostfs.CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]bool{}
	for _, pattern := range []string{filepath.Join(root, prefix+"*"), "/sys/fs/bpf/" + prefix + "*"} {
		matches, err := filepath.Glob(pattern)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range matches {
			found[m] = true
		}
	}
	return found
}

// checkNoLeftovers fails t for each cgroup or pin directory named prefix*
// that was not there before.
func checkNoLeftovers(t *testing.T, prefix string, before map[string]bool) {
	t.Helper()
	for path := range leftovers(t, prefix) {
		if !before[path] {
			t.Errorf("%s left behind", path)
		}
	}
}

func readSysctl(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/proc/sys", name))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}
