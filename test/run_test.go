package test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sockredir/sockredir/test/harness"
)

// runResult is a finished `sockredir run`.
type runResult struct {
	code           int
	stdout, stderr string
}

// sockredirRun runs `sockredir run --log-format json ARGS...` in the test's
// network namespace.
func sockredirRun(t *testing.T, e *harness.Env, env []string, args ...string) runResult {
	t.Helper()
	cmd := exec.Command(sockredirBinary(t), append([]string{"run", "--log-format", "json"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	e.Do(func() error {
		var exit *exec.ExitError
		if err := cmd.Run(); err != nil && !errors.As(err, &exit) {
			return err
		}
		return nil
	})
	return runResult{cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()}
}

// runCgroup is the cgroup that a command run by `sockredir run` printed as
// its own (`cat /proc/self/cgroup`).
func runCgroup(t *testing.T, e *harness.Env, stdout string) string {
	t.Helper()
	for line := range strings.Lines(stdout) {
		if rel, ok := strings.CutPrefix(strings.TrimSpace(line), "0::"); ok {
			return filepath.Join(filepath.Dir(e.Cgroup), rel) // the run's cgroup is a sibling of the test's
		}
	}
	t.Fatalf("no cgroup v2 line in %q", stdout)
	return ""
}

// removedAfterRun fails the test if the cgroup or pins of a run are left.
func removedAfterRun(t *testing.T, cgroup string) {
	t.Helper()
	if !strings.HasPrefix(filepath.Base(cgroup), "sockredir-run-") {
		t.Fatalf("the command ran in %s, not in a cgroup of its own", cgroup)
	}
	if _, err := os.Stat(cgroup); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cgroup %s left behind: %v", cgroup, err)
	}
	if _, err := os.Stat(filepath.Join("/sys/fs/bpf", filepath.Base(cgroup))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pins of %s left behind: %v", cgroup, err)
	}
}

func TestRunExitStatus(t *testing.T) {
	e := harness.New(t)
	for _, c := range []struct {
		name   string
		script string
		want   int
	}{
		{"success", "exit 0", 0},
		{"failure", "exit 7", 7},
		{"killed by a signal", "kill -TERM $$", 128 + int(syscall.SIGTERM)},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := sockredirRun(t, e, nil, "--", "sh", "-c", "cat /proc/self/cgroup; "+c.script)
			if r.code != c.want {
				t.Errorf("exit status %d, want %d; stderr:\n%s", r.code, c.want, r.stderr)
			}
			removedAfterRun(t, runCgroup(t, e, r.stdout))
		})
	}
	for _, c := range []struct {
		name string
		args []string
		want int
		says string
	}{
		{"not found", []string{"--", "/nonexistent/command"}, 127, "sockredir run: starting /nonexistent/command"},
		// sockredir's own failures must not pass for the command's status.
		{"unknown flag", []string{"--no-such-flag", "--", "true"}, 125, "unknown flag: --no-such-flag"},
		{"no command", nil, 125, "requires at least 1 arg"},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := leftovers(t, "sockredir-run-")
			r := sockredirRun(t, e, nil, c.args...)
			if r.code != c.want || !strings.Contains(r.stderr, c.says) {
				t.Errorf("exit status %d, stderr %q: want %d and a line saying %q", r.code, r.stderr, c.want, c.says)
			}
			checkNoLeftovers(t, "sockredir-run-", before)
		})
	}
}

// A signal sent to `sockredir run` reaches the command, and what the command
// leaves running is ended with it.
func TestRunForwardsSignals(t *testing.T) {
	e := harness.New(t)
	cmd := exec.Command(sockredirBinary(t), "run", "--", "sh", "-c", "sleep 60 & grep ^0:: /proc/self/cgroup; exec sleep 60")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	p := harness.StartProcess(t, e.NS, nil, cmd)
	t.Cleanup(func() {
		// By pid, only the run this test started: SIGTERM lets it clean
		// up; SIGKILL would leave its cgroup and pins.
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.Done():
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-p.Done()
		}
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	cgroup := runCgroup(t, e, line)
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("sockredir run did not end after SIGTERM")
	}
	if code := cmd.ProcessState.ExitCode(); code != 128+int(syscall.SIGTERM) {
		t.Errorf("exit status %d, want %d (the command killed by SIGTERM); stderr:\n%s", code, 128+int(syscall.SIGTERM), stderr.String())
	}
	if !strings.Contains(stderr.String(), "left processes running") {
		t.Errorf("no warning about the background sleep that was killed:\n%s", stderr.String())
	}
	removedAfterRun(t, cgroup)
}

// Only the command is accelerated: its transfer is redirected, while the
// same transfer by a process outside it is not.
func TestRunAcceleratesOnlyTheCommand(t *testing.T) {
	e := harness.New(t)
	tr := harness.Transfer{Listen: "127.0.0.1:0", Bytes: 16 << 20, Seed: 500}
	res, r := runTransfer(t, e, tr)
	if res.TCPOutSegs > handshakeSegments {
		t.Errorf("the command sent %d TCP segments for %d bytes: its data took the TCP path", res.TCPOutSegs, 2*tr.Bytes)
	}
	summary := runSummary(r.stderr)
	if summary["sockets_added"] != 2.0 || summary["bytes_redirected"] != float64(2*tr.Bytes) {
		t.Errorf("run's summary: %v, want 2 sockets added and %d bytes redirected\n%s", summary, 2*tr.Bytes, r.stderr)
	}

	// The same transfer from outside the command must not be accelerated.
	requirePlainTCP(t, e, tr, "a process outside the command (accelerated too?)")
}

// run keeps its datapath up as the daemon does: a command whose reader
// falls behind gets its connection put back on TCP, which holds the sender
// back, and every byte arrives.
func TestRunHoldsBackSlowReaders(t *testing.T) {
	e := harness.New(t)
	_, r := runTransfer(t, e, slowReaderTransfer(501), "--max-backlog", "4194304")
	summary := runSummary(r.stderr)
	if passed, _ := summary["bytes_passed"].(float64); passed == 0 {
		t.Errorf("run's summary: %v, want bytes passed to TCP once the reader fell behind\n%s", summary, r.stderr)
	}
}

// runTransfer runs tr as the command of `sockredir run` with flags, and
// checks that it succeeded and that every byte arrived.
func runTransfer(t *testing.T, e *harness.Env, tr harness.Transfer, flags ...string) (harness.TransferResult, runResult) {
	t.Helper()
	agent, err := harness.AgentEnv(harness.Scenario{Transfer: &tr})
	if err != nil {
		t.Fatal(err)
	}
	flags = append([]string{"--config", noProbationConfig(t)}, flags...)
	r := sockredirRun(t, e, []string{agent}, append(flags, "--", os.Args[0], "-test.run=^$")...)
	if r.code != 0 {
		t.Fatalf("exit status %d:\n%s", r.code, r.stderr)
	}
	var res harness.TransferResult
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatalf("agent result %q: %v", r.stdout, err)
	}
	tr.Check(t, &res)
	return res, r
}

// runSummary is the summary that `sockredir run` logs when it is done.
func runSummary(stderr string) map[string]any {
	var summary map[string]any
	for line := range strings.Lines(stderr) {
		var l map[string]any
		if json.Unmarshal([]byte(line), &l) == nil && l["msg"] == "sockredir run: done" {
			summary = l
		}
	}
	return summary
}
