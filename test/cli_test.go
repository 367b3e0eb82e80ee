package test

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/test/harness"
)

var (
	buildOnce  sync.Once
	builtPath  string
	buildError error
)

// sockredirBinary is the sockredir next to the test binary (make
// test-kernels puts both in build/ and in the VMs' /bin), or a fresh build of
// cmd/sockredir.
func sockredirBinary(t *testing.T) string {
	if p := filepath.Join(filepath.Dir(os.Args[0]), "sockredir"); isExecutable(p) {
		return p
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "sockredir-bin-")
		if err != nil {
			buildError = err
			return
		}
		os.Chmod(dir, 0o755) // the unprivileged test runs it too
		builtPath = filepath.Join(dir, "sockredir")
		out, err := exec.Command("go", "build", "-o", builtPath, "../cmd/sockredir").CombinedOutput()
		if err != nil {
			buildError = errors.New(string(out))
		}
	})
	if buildError != nil {
		t.Fatalf("building sockredir: %v", buildError)
	}
	return builtPath
}

// noProbation is a policy that accelerates a server port's connections
// from the first one, for the tests of commands whose servers are new each
// time (probation_test.go tests probation).
const noProbation = "redirect:\n  accelerate_new_ports: true\n"

// noProbationConfig writes noProbation to a file, for --config.
func noProbationConfig(t *testing.T) string {
	path := filepath.Join(t.TempDir(), "sockredir.yaml")
	if err := os.WriteFile(path, []byte(noProbation), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

type cliResult struct {
	code           int
	stdout, stderr string
}

func runCLI(t *testing.T, attr *syscall.SysProcAttr, args ...string) cliResult {
	t.Helper()
	cmd := exec.Command(sockredirBinary(t), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr, cmd.SysProcAttr = &stdout, &stderr, attr
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatal(err)
	}
	return cliResult{cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()}
}

func TestCLIUpStatusDown(t *testing.T) {
	e := harness.New(t)
	if r := runCLI(t, nil, "up", "--cgroup", e.Cgroup, "--pin-dir", e.PinDir); r.code != 0 {
		t.Fatalf("up: exit %d: %s", r.code, r.stderr)
	} else if !strings.Contains(r.stderr, "sockredir daemon") {
		t.Errorf("up's log doesn't say what it leaves to the daemon: %s", r.stderr)
	}
	if r := runCLI(t, nil, "up", "--cgroup", e.Cgroup, "--pin-dir", e.PinDir, "--log-format", "json"); r.code != 0 ||
		!strings.Contains(r.stderr, `"msg":"already up"`) {
		t.Errorf("second up: exit %d, want 0 and a JSON log saying it is already up: %s", r.code, r.stderr)
	}
	r := runCLI(t, nil, "status", "--pin-dir", e.PinDir, "--json")
	var st datapath.Status
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || r.code != 0 {
		t.Fatalf("status --json: exit %d, %v: %s%s", r.code, err, r.stdout, r.stderr)
	}
	if !st.Up || st.Cgroup != e.Cgroup || len(st.Programs) != 3 {
		t.Errorf("status: %+v", st)
	}
	if r := runCLI(t, nil, "status", "--pin-dir", e.PinDir); !strings.Contains(r.stdout, "state:") {
		t.Errorf("status: %s", r.stdout)
	}
	if r := runCLI(t, nil, "down", "--pin-dir", e.PinDir); r.code != 0 {
		t.Fatalf("down: exit %d: %s", r.code, r.stderr)
	}
	if r := runCLI(t, nil, "down", "--pin-dir", e.PinDir); r.code != 0 || !strings.Contains(r.stderr, "not up") {
		t.Errorf("down with nothing up: exit %d, want 0 and a note: %s", r.code, r.stderr)
	}
	if r := runCLI(t, nil, "status", "--pin-dir", e.PinDir); !strings.Contains(r.stdout, "not up") {
		t.Errorf("status with nothing up: %s", r.stdout)
	}
}

// up again finds the datapath however its cgroup is written, and refuses a
// map size it can't change, leaving the datapath as it was.
func TestCLIUpAgain(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{MapSize: 4})
	if r := runCLI(t, nil, "up", "--cgroup", e.Cgroup+"/", "--pin-dir", e.PinDir); r.code != 0 || !strings.Contains(r.stderr, "already up") {
		t.Errorf("up with the cgroup written with a trailing slash: exit %d: %s", r.code, r.stderr)
	}
	up := exec.Command(sockredirBinary(t), "up", "--cgroup", filepath.Base(e.Cgroup), "--pin-dir", e.PinDir)
	up.Dir = filepath.Dir(e.Cgroup)
	if out, err := up.CombinedOutput(); err != nil || !strings.Contains(string(out), "already up") {
		t.Errorf("up with the cgroup written relative to the working directory: %v: %s", err, out)
	}
	r := runCLI(t, nil, "up", "--cgroup", e.Cgroup, "--pin-dir", e.PinDir, "--map-size", "8")
	if r.code != 1 || !strings.Contains(r.stderr, "holds 4 sockets, not 8: run `sockredir down") {
		t.Errorf("up with another map size: exit %d, stderr %q: want exit 1 and that it can't be resized", r.code, r.stderr)
	}
	if st := e.Status(); !st.Up || st.MapSize != 4 || st.Cgroup != e.Cgroup {
		t.Errorf("after the refused resize: up %v, map size %d, cgroup %s; want up, 4, %s", st.Up, st.MapSize, st.Cgroup, e.Cgroup)
	}
}

// Bad input gets one clear line, exit status 1, and leaves nothing attached
// or pinned.
func TestCLIErrors(t *testing.T) {
	e := harness.New(t)
	foreign := e.PinDir + "-foreign"
	if err := os.Mkdir(foreign, 0o700); err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(foreign)
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Pin(filepath.Join(foreign, "someone_elses_map")); err != nil {
		t.Fatal(err)
	}
	nobody := &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}

	for _, c := range []struct {
		name   string
		attr   *syscall.SysProcAttr
		args   []string
		pinDir string
		want   string
	}{
		{"missing cgroup", nil, []string{"up", "--cgroup", e.Cgroup + "/nope"}, e.PinDir, "does not exist"},
		{"not a cgroup", nil, []string{"up", "--cgroup", "/proc"}, e.PinDir, "is not a cgroup v2 directory"},
		{"pin dir not on bpffs", nil, []string{"up", "--cgroup", e.Cgroup}, t.TempDir() + "/pins", "is not on a BPF filesystem"},
		{"foreign pin dir", nil, []string{"up", "--cgroup", e.Cgroup}, foreign, "not sockredir's"},
		{"not root", nobody, []string{"up", "--cgroup", e.Cgroup}, e.PinDir, "needs root"},
		{"bad log format", nil, []string{"up", "--log-format", "xml", "--cgroup", e.Cgroup}, e.PinDir, "--log-format must be console or json"},
		// Fails after up wrote its first pin: what it made must go again.
		{"map too large", nil, []string{"up", "--cgroup", e.Cgroup, "--map-size", "4294967295"}, e.PinDir, "--map-size"},
		{"negative drain timeout", nil, []string{"down", "--drain-timeout", "-1s"}, e.PinDir, "-1s is negative"},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := runCLI(t, c.attr, append(c.args, "--pin-dir", c.pinDir)...)
			if r.code != 1 || !strings.Contains(r.stderr, c.want) || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
				t.Errorf("exit %d, stderr %q: want exit 1 and one line containing %q", r.code, r.stderr, c.want)
			}
			if c.pinDir != foreign {
				if _, err := os.Stat(c.pinDir); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("pin directory %s left behind", c.pinDir)
				}
			} else if entries, _ := os.ReadDir(foreign); len(entries) != 1 {
				t.Errorf("the foreign pin directory was changed: %v", entries)
			}
			if ids := e.AttachedSockOps(); len(ids) != 0 {
				t.Errorf("sock_ops programs left attached: %v", ids)
			}
		})
	}
}

// Ctrl-C while `up` runs leaves the datapath whole: attached and pinned,
// never pins without the programs that use them.
func TestCLIUpInterrupted(t *testing.T) {
	e := harness.New(t)
	up := exec.Command(sockredirBinary(t), "up", "--cgroup", e.Cgroup, "--pin-dir", e.PinDir)
	var stderr bytes.Buffer
	up.Stderr = &stderr
	if err := up.Start(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		if _, err := os.Stat(e.PinDir); err == nil {
			break // up is under way
		}
		if time.Now().After(deadline) {
			up.Process.Kill() // by pid: the process this test started
			up.Wait()
			t.Fatal("up made no pin directory")
		}
	}
	up.Process.Signal(os.Interrupt)
	up.Wait()
	code := up.ProcessState.ExitCode()
	if code != 0 && (code != 1 || !strings.Contains(stderr.String(), "interrupted while up ran, which finished first")) {
		t.Errorf("up interrupted: exit %d, stderr %q; want 0, or 1 saying it finished first", code, stderr.String())
	}
	if st := e.Status(); !st.Up || len(e.AttachedSockOps()) != 1 {
		t.Errorf("after the interrupted up: up %v, sock_ops programs attached %v; want up, one", st.Up, e.AttachedSockOps())
	}
}

// Ctrl-C ends an up that waits for another up or down of its pin directory,
// with nothing attached.
func TestCLIUpStopsWaitingOnCtrlC(t *testing.T) {
	e := harness.New(t)
	checkStopsWaiting(t, e, os.Interrupt, "up", "--cgroup", e.Cgroup, "--pin-dir", e.PinDir)
}

// checkStopsWaiting runs sockredir with args while the lock of e's pin
// directory is held, as a running down holds it, sends it sig after half a
// second, and fails t unless it ends with exit 1 saying it stopped waiting,
// with nothing attached.
func checkStopsWaiting(t *testing.T, e *harness.Env, sig os.Signal, args ...string) {
	t.Helper()
	if err := os.Mkdir(e.PinDir, 0o700); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(e.PinDir)
	held, err := os.Open(e.PinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := unix.Flock(int(held.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(sockredirBinary(t), args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	cmd.Process.Signal(sig) // by pid: the process this test started
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("sockredir %s went on waiting after %s", args[0], sig)
	}
	if code := cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(stderr.String(), "stopped waiting for another sockredir up or down") {
		t.Errorf("exit %d, stderr %q: want 1 and that it stopped waiting", code, stderr.String())
	}
	if ids := e.AttachedSockOps(); len(ids) != 0 {
		t.Errorf("sock_ops programs attached: %v", ids)
	}
}

// down removes an empty pin directory, which an up killed before its first
// pin leaves, and says nothing was up.
func TestCLIDownRemovesAnEmptyPinDir(t *testing.T) {
	e := harness.New(t)
	if err := os.Mkdir(e.PinDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if r := runCLI(t, nil, "down", "--pin-dir", e.PinDir); r.code != 0 || !strings.Contains(r.stderr, "not up") {
		t.Errorf("down: exit %d, stderr %q; want 0 and that nothing was up", r.code, r.stderr)
	}
	if _, err := os.Stat(e.PinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the empty pin directory is still there: %v", err)
	}
}
