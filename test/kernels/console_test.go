package main

import (
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// A serial console as the VM prints it: CRLF line ends, a kernel message
// and parallel subtests whose logs are interleaved (output of go1.26).
const vmConsole = "SOCKREDIR-UNAME 6.12.117+deb12-cloud-amd64\r\n" +
	`=== RUN   TestPar
=== RUN   TestPar/a
=== PAUSE TestPar/a
=== RUN   TestPar/b
=== PAUSE TestPar/b
=== RUN   TestPar/c/nested
=== PAUSE TestPar/c/nested
=== CONT  TestPar/a
=== CONT  TestPar/c/nested
=== CONT  TestPar/b
    par_test.go:18: b logging
=== NAME  TestPar/a
    par_test.go:12: KNOWN-BAD: a is broken here
    par_test.go:13: skip a
=== NAME  TestPar/b
    par_test.go:20: plain skip b
[    2.123456] IPv6: ADDRCONF(NETDEV_CHANGE): veth0: link becomes ready
--- FAIL: TestPar (0.00s)
    --- FAIL: TestPar/c/nested (0.00s)
    --- SKIP: TestPar/a (0.02s)
    --- SKIP: TestPar/b (0.03s)
=== RUN   TestCutShort
FAIL
SOCKREDIR-EXIT 1
`

func TestParseConsole(t *testing.T) {
	report, err := parseConsole(strings.NewReader(vmConsole))
	if err != nil {
		t.Fatal(err)
	}
	if report.release != "6.12.117+deb12-cloud-amd64" {
		t.Errorf("release = %q", report.release)
	}
	if !report.exited || report.exitCode != 1 {
		t.Errorf("exited, exitCode = %v, %d; want true, 1", report.exited, report.exitCode)
	}
	wantOrder := []string{"TestPar", "TestPar/a", "TestPar/b", "TestPar/c/nested", "TestCutShort"}
	if !slices.Equal(report.tests, wantOrder) {
		t.Errorf("tests = %q, want %q", report.tests, wantOrder)
	}
	want := map[string]testStatus{
		"TestPar":          statusFail,
		"TestPar/a":        statusKnownBad,
		"TestPar/b":        statusSkip,
		"TestPar/c/nested": statusFail,
		"TestCutShort":     statusFail, // started, never reported
	}
	if !maps.Equal(report.status, want) {
		t.Errorf("status = %v, want %v", report.status, want)
	}
}

func TestParseConsoleWithoutExitMarker(t *testing.T) {
	report, err := parseConsole(strings.NewReader("=== RUN   TestA\n--- PASS: TestA (0.00s)\n[ 3.1] Kernel panic"))
	if err != nil {
		t.Fatal(err)
	}
	if report.exited {
		t.Error("exited = true without an exit marker")
	}
	if report.status["TestA"] != statusPass {
		t.Errorf("TestA = %q, want pass", report.status["TestA"])
	}
}

func TestNaturalCompareSortsKernelsByVersion(t *testing.T) {
	packages := []string{
		"linux-image-6.12.117+deb12-cloud-amd64",
		"linux-image-6.12.99+deb12-cloud-amd64",
		"linux-image-6.12.100+deb12-cloud-amd64",
	}
	slices.SortFunc(packages, naturalCompare)
	if newest := packages[len(packages)-1]; newest != "linux-image-6.12.117+deb12-cloud-amd64" {
		t.Errorf("newest = %s", newest)
	}
}

// A guest that died of an int3 trap at a code patching site (as 6.12 under
// qemu's TCG did) is told apart from one that crashed otherwise.
func TestParseConsolePatchTrap(t *testing.T) {
	for console, want := range map[string]bool{
		"=== RUN   TestX\n[   95.922316] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n" +
			"[   95.922793] RIP: 0010:bpf_lsm_file_permission+0x5/0x10\n": true,
		"=== RUN   TestX\n[   12.000000] int3: 0000 [#1] PREEMPT SMP NOPTI\n":                 true,
		"=== RUN   TestX\n[   12.000000] BUG: kernel NULL pointer dereference, address: 0\n":  false,
		"=== RUN   TestX\n    x_test.go:1: int3 is an instruction\n--- PASS: TestX (0.00s)\n": false,
	} {
		report, err := parseConsole(strings.NewReader(console))
		if err != nil {
			t.Fatal(err)
		}
		if report.patchTrap != want {
			t.Errorf("patchTrap = %v, want %v, for\n%s", report.patchTrap, want, console)
		}
	}
}

// Only a guest that ended without test results is booted again: one that
// died or hung before its first test, or died of the TCG int3 trap.
func TestWhyBootAgain(t *testing.T) {
	const release = "SOCKREDIR-UNAME 6.1.0-57-cloud-amd64\n"
	for _, c := range []struct {
		console, result string
		again           bool
	}{
		{"", "timeout after 15m0s", true},
		{release, "timeout after 15m0s", true},
		{"[ 2.2] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n", "no exit marker (guest crashed?)", true},
		{release + "=== RUN   TestX\n[ 95.9] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n", "no exit marker (guest crashed?)", true},
		{release + "=== RUN   TestX\n", "timeout after 15m0s", false},
		{release + "=== RUN   TestX\n[ 12.0] BUG: kernel NULL pointer dereference\n", "no exit marker (guest crashed?)", false},
		{"SOCKREDIR-SETUP-FAILED: insmod veth\nSOCKREDIR-EXIT 125\n", "VM setup failed", false},
		{release + "SOCKREDIR-EXIT 143\n", "exit 143", false},
		{release + "=== RUN   TestX\n--- PASS: TestX (0.00s)\nSOCKREDIR-EXIT 0\n", resultOK, false},
	} {
		report, err := parseConsole(strings.NewReader(c.console))
		if err != nil {
			t.Fatal(err)
		}
		if why := report.whyBootAgain(c.result); (why != "") != c.again {
			t.Errorf("whyBootAgain(%q) = %q for console\n%s", c.result, why, c.console)
		}
	}
}

// A VM whose console shows no test starting within the limit is stopped;
// one that started its tests is left to run.
func TestWatchFirstTest(t *testing.T) {
	for console, wantStopped := range map[string]bool{
		"SOCKREDIR-UNAME 6.1.0-57-cloud-amd64\n":                         true,
		"SOCKREDIR-UNAME 6.1.0-57-cloud-amd64\n=== RUN   TestAppRedis\n": false,
	} {
		log := filepath.Join(t.TempDir(), "console.log")
		if err := os.WriteFile(log, []byte(console), 0o644); err != nil {
			t.Fatal(err)
		}
		ctx, stop := context.WithCancelCause(context.Background())
		watchFirstTest(ctx, log, 10*time.Millisecond, stop)
		if stopped := errors.Is(context.Cause(ctx), errNoTestYet); stopped != wantStopped {
			t.Errorf("stopped: %v, want %v, for console %q", stopped, wantStopped, console)
		}
		stop(nil)
	}
}
