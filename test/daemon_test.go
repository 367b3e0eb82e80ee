package test

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/sandbox"
	"github.com/sockredir/sockredir/test/harness"
)

// daemonProcess is `sockredir daemon` running in the test's network
// namespace (not in its cgroup), with its JSON log lines collected.
type daemonProcess struct {
	t     *testing.T
	e     *harness.Env
	cmd   *exec.Cmd
	exit  chan error
	mu    sync.Mutex
	lines []map[string]any
	added chan struct{} // a log line arrived
}

func startDaemon(t *testing.T, e *harness.Env, args ...string) *daemonProcess {
	t.Helper()
	return startWrappedDaemon(t, e, nil, args...)
}

// startWrappedDaemon starts the daemon through wrapper, a command that runs
// the command line that follows it (such as setpriv).
func startWrappedDaemon(t *testing.T, e *harness.Env, wrapper []string, args ...string) *daemonProcess {
	t.Helper()
	d := &daemonProcess{t: t, e: e, exit: make(chan error, 1), added: make(chan struct{}, 1)}
	args = append([]string{sockredirBinary(t), "daemon", "--log-format", "json", "--cgroup", e.Cgroup, "--pin-dir", e.PinDir,
		"--metrics-addr", "127.0.0.1:0", "--rescan-interval", "200ms"}, args...)
	args = append(wrapper, args...)
	d.cmd = exec.Command(args[0], args[1:]...)
	stderr, err := d.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan error)
	// Started and waited for on one thread in the namespace: the daemon
	// inherits the namespace, and Pdeathsig follows that thread.
	go func() {
		d.exit <- e.NS.Do(func() error {
			d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			err := d.cmd.Start()
			started <- err
			if err != nil {
				return err
			}
			d.collect(stderr)
			return d.cmd.Wait()
		})
	}()
	if err := <-started; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if d.cmd.ProcessState == nil {
			d.cmd.Process.Kill() // by pid: only the daemon this test started
			<-d.exit
		}
	})
	d.waitLog("daemon running", nil)
	return d
}

func (d *daemonProcess) collect(r io.Reader) {
	s := bufio.NewScanner(r)
	for s.Scan() {
		var line map[string]any
		if err := json.Unmarshal(s.Bytes(), &line); err != nil {
			line = map[string]any{"msg": "unparsed: " + s.Text()}
		}
		d.mu.Lock()
		d.lines = append(d.lines, line)
		d.mu.Unlock()
		select {
		case d.added <- struct{}{}:
		default:
		}
	}
}

// waitLog waits for a log line with message msg for which match (if any)
// holds, and returns it.
func (d *daemonProcess) waitLog(msg string, match func(map[string]any) bool) map[string]any {
	d.t.Helper()
	deadline := time.After(30 * time.Second)
	for seen := 0; ; {
		d.mu.Lock()
		lines := d.lines[seen:]
		seen = len(d.lines)
		d.mu.Unlock()
		for _, l := range lines {
			if l["msg"] == msg && (match == nil || match(l)) {
				return l
			}
		}
		select {
		case <-d.added:
		case err := <-d.exit:
			d.exit <- err
			d.t.Fatalf("the daemon exited (%v) before logging %q:\n%s", err, msg, d.log())
		case <-deadline:
			d.t.Fatalf("the daemon did not log %q within 30s:\n%s", msg, d.log())
		}
	}
}

func (d *daemonProcess) log() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var b strings.Builder
	for _, l := range d.lines {
		line, _ := json.Marshal(l)
		b.Write(line)
		b.WriteByte('\n')
	}
	return b.String()
}

func (d *daemonProcess) signal(sig os.Signal) {
	d.t.Helper()
	if err := d.cmd.Process.Signal(sig); err != nil {
		d.t.Fatal(err)
	}
}

// wait waits for the daemon to exit and returns its exit status.
func (d *daemonProcess) wait() int {
	d.t.Helper()
	select {
	case err := <-d.exit:
		var exit *exec.ExitError
		if err != nil && !errors.As(err, &exit) {
			d.t.Fatal(err)
		}
		return d.cmd.ProcessState.ExitCode()
	case <-time.After(time.Minute):
		d.t.Fatalf("the daemon did not exit:\n%s", d.log())
		return -1
	}
}

// scrape reads the daemon's metrics, from inside the test's namespace where
// the daemon listens on loopback.
func (d *daemonProcess) scrape() map[string]float64 {
	d.t.Helper()
	addr := d.waitLog("serving metrics", nil)["addr"].(string)
	metrics := map[string]float64{}
	d.e.Do(func() error {
		// Dialed here, on the namespace's thread: http.Client would
		// dial from another goroutine, which may be on any thread.
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			return fmt.Errorf("%w; the daemon's log:\n%s", err, d.log())
		}
		defer conn.Close()
		fmt.Fprintf(conn, "GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n", addr)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET /metrics: %s", resp.Status)
		}
		s := bufio.NewScanner(resp.Body)
		for s.Scan() {
			name, value, ok := strings.Cut(s.Text(), " ")
			if !ok || strings.HasPrefix(name, "#") {
				continue
			}
			if v, err := strconv.ParseFloat(value, 64); err == nil {
				metrics[name] = v
			}
		}
		return s.Err()
	})
	return metrics
}

// addrsChanged matches a "local addresses changed" line that adds or
// removes addr.
func addrsChanged(key, addr string) func(map[string]any) bool {
	return func(l map[string]any) bool {
		list, _ := l[key].([]any)
		return slices.Contains(list, any(addr))
	}
}

// More local addresses than the datapath holds: the daemon warns, once,
// and goes on, with the addresses that fit in place.
func TestDaemonWithMoreAddressesThanFit(t *testing.T) {
	e := harness.New(t)
	d := startDaemon(t, e, "--config", noProbationConfig(t), "--rescan-interval", "100ms")
	addVeth(e, "srd0")
	addAddrs(e, "srd0", addrRange(netip.MustParseAddr("10.204.0.0"), localAddrsCapacity+1))
	d.waitLog("not every local address is accelerated", nil)
	time.Sleep(500 * time.Millisecond) // rescans, each applying the set again
	if n := strings.Count(d.log(), "not every local address is accelerated"); n != 1 {
		t.Errorf("warned %d times that addresses don't fit, want once:\n%s", n, d.log())
	}
	if m := d.scrape(); m["sockredir_up"] != 1 {
		t.Errorf("sockredir_up = %v, want 1", m["sockredir_up"])
	}
}

// The daemon brings the datapath up, follows pods that start after it and
// addresses that come and go, counts what it redirects in its metrics,
// reloads on SIGHUP, and on SIGTERM leaves the datapath attached.
func TestDaemon(t *testing.T) {
	e := harness.New(t)
	config := noProbationConfig(t)
	d := startDaemon(t, e, "--config", config)
	if m := d.scrape(); m["sockredir_up"] != 1 || m["sockredir_map_capacity_sockets"] != datapath.DefaultMapSize ||
		m["sockredir_redirected_bytes_total"] != 0 {
		t.Errorf("metrics right after start: %v", m)
	}

	// Pods that appear once the daemon runs.
	pods := newPodPair(e, e.NS, "d")
	e.Pause(pods.client)
	e.Pause(pods.server)
	for _, pod := range []*harness.Pod{pods.client, pods.server} {
		d.waitLog("local addresses changed", addrsChanged("added", pod.Addr))
	}
	goFile := filepath.Join(t.TempDir(), "go")
	if err := os.WriteFile(goFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	const bytes = 8 << 20
	startPodTransfer(e, pods, 7000, bytes, 400, goFile).check(t)
	m := d.scrape()
	for name, want := range map[string]float64{
		"sockredir_up":                     1,
		"sockredir_sockets_added_total":    2,
		"sockredir_redirected_bytes_total": 2 * bytes,
		"sockredir_passed_messages_total":  0,
		"sockredir_add_failures_total":     0,
		"sockredir_network_namespaces":     3, // the node's and the two pods'
		"sockredir_map_capacity_sockets":   datapath.DefaultMapSize,
	} {
		if got, ok := m[name]; !ok || got != want {
			t.Errorf("%s = %v (present: %v), want %v", name, got, ok, want)
		}
	}
	if m["sockredir_redirected_messages_total"] == 0 {
		t.Error("sockredir_redirected_messages_total did not move")
	}

	// An address added on the node, then removed.
	addVeth(e, "srd0", "10.81.0.1/24")
	d.waitLog("local addresses changed", addrsChanged("added", "10.81.0.1"))
	e.Do(func() error {
		link, err := netlink.LinkByName("srd0")
		if err != nil {
			return err
		}
		return netlink.LinkDel(link)
	})
	d.waitLog("local addresses changed", addrsChanged("removed", "10.81.0.1"))

	// A policy that leaves port 7001 alone, put in place by SIGHUP.
	if err := os.WriteFile(config, []byte(noProbation+"  exclude_ports: [7001]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d.signal(syscall.SIGHUP)
	d.waitLog("reloaded", nil)
	startPodTransfer(e, pods, 7001, bytes, 500, goFile).check(t)
	if m := d.scrape(); m["sockredir_up"] != 1 || m["sockredir_policy_skipped_total"] != 1 || m["sockredir_sockets_added_total"] != 2 {
		t.Errorf("after SIGHUP with a policy excluding port 7001: up %v, policy skipped %v, sockets added %v; want 1, 1, 2",
			m["sockredir_up"], m["sockredir_policy_skipped_total"], m["sockredir_sockets_added_total"])
	}
	// A broken file is refused, and the daemon carries on.
	if err := os.WriteFile(config, []byte("redirect:\n  exclude_portz: [1]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d.signal(syscall.SIGHUP)
	d.waitLog("reload failed; carrying on as before", nil)

	d.signal(syscall.SIGTERM)
	if code := d.wait(); code != 0 {
		t.Fatalf("the daemon exited with %d on SIGTERM:\n%s", code, d.log())
	}
	if st := e.Status(); !st.Up || st.Counters.BytesRedirected != 2*bytes {
		t.Errorf("after SIGTERM the datapath must stay up with its counters: %+v", st)
	}
	if ids := e.AttachedSockOps(); len(ids) != 1 {
		t.Errorf("sock_ops programs attached after the daemon exited: %v, want 1", ids)
	}

	// A second daemon takes over what the first left, and with
	// --down-on-exit removes it.
	d = startDaemon(t, e, "--down-on-exit")
	d.waitLog("already up", nil)
	d.signal(syscall.SIGINT)
	if code := d.wait(); code != 0 {
		t.Fatalf("the daemon exited with %d on SIGINT:\n%s", code, d.log())
	}
	if _, err := os.Stat(e.PinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("--down-on-exit left the pin directory: %v", err)
	}
	if ids := e.AttachedSockOps(); len(ids) != 0 {
		t.Errorf("--down-on-exit left sock_ops programs attached: %v", ids)
	}
}

// A daemon that can't start says why in one line and exits 1, leaving
// nothing attached.
func TestDaemonStartErrors(t *testing.T) {
	e := harness.New(t)
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"unreadable config", []string{"--config", "/nonexistent/sockredir.yaml"}, "reading config"},
		{"bad metrics address", []string{"--metrics-addr", "256.0.0.1:1"}, "serving metrics"},
		{"negative check interval", []string{"--check-interval", "-1s"}, "--check-interval -1s is negative"},
	} {
		t.Run(c.name, func(t *testing.T) {
			args := append([]string{"daemon", "--cgroup", e.Cgroup, "--pin-dir", e.PinDir}, c.args...)
			r := runCLI(t, nil, args...)
			if r.code != 1 || !strings.Contains(r.stderr, c.want) {
				t.Errorf("exit %d, stderr %q: want exit 1 and %q", r.code, r.stderr, c.want)
			}
			if _, err := os.Stat(e.PinDir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the failed start left the pin directory: %v", err)
			}
		})
	}
}

// deployedCapabilities are the capabilities deploy/kubernetes/daemonset.yaml
// and deploy/systemd/sockredir.service give the daemon (their tests in
// cmd/sockredir check that they say so).
var deployedCapabilities = map[string]uintptr{
	"sys_admin": unix.CAP_SYS_ADMIN, "net_admin": unix.CAP_NET_ADMIN, "sys_ptrace": unix.CAP_SYS_PTRACE,
}

// boundingSetEnv turns this test binary into a wrapper, as util-linux's
// `setpriv --bounding-set` is (the kernel matrix's busybox has no such
// option): it keeps only the deployedCapabilities named in it
// (comma-separated) in its bounding set, then runs its arguments.
const boundingSetEnv = "SOCKREDIR_TEST_BOUNDING_SET"

func maybeExecWithBoundingSet() {
	keep, ok := os.LookupEnv(boundingSetEnv)
	if !ok {
		return
	}
	if err := execWithBoundingSet(strings.Split(keep, ","), os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "limiting the bounding set: %v\n", err)
		os.Exit(125)
	}
}

func execWithBoundingSet(keep, args []string) error {
	if len(args) == 0 {
		return errors.New("no command to run")
	}
	kept := map[uintptr]bool{}
	for _, name := range keep {
		c, ok := deployedCapabilities[name]
		if !ok {
			return fmt.Errorf("unknown capability %q", name)
		}
		kept[c] = true
	}
	data, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err != nil {
		return err
	}
	last, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		return err
	}
	// The bounding set belongs to a thread: drop and exec on this one.
	runtime.LockOSThread()
	for c := range uintptr(last + 1) {
		if !kept[c] {
			if err := unix.Prctl(unix.PR_CAPBSET_DROP, c, 0, 0, 0); err != nil {
				return fmt.Errorf("dropping capability %d: %w", c, err)
			}
		}
	}
	// Ambient capabilities would outlive the bounding set across exec.
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return fmt.Errorf("clearing the ambient capabilities: %w", err)
	}
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, boundingSetEnv+"=") })
	return syscall.Exec(args[0], args, env)
}

// With only the deployed capabilities, the daemon brings the datapath up
// and follows the network namespace of a pod whose process runs as another
// user, as pods do.
func TestDaemonWithDeployedCapabilities(t *testing.T) {
	e := harness.New(t)
	pods := newPodPair(e, e.NS, "k")
	startAsOtherUser(t, e, pods.server, "sleep", "600")

	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	keep := slices.Sorted(maps.Keys(deployedCapabilities))
	d := startWrappedDaemon(t, e, []string{"env", boundingSetEnv + "=" + strings.Join(keep, ","), self})
	d.waitLog("attached", nil)
	d.waitLog("local addresses changed", addrsChanged("added", pods.server.Addr))
	if m := d.scrape(); m["sockredir_up"] != 1 || m["sockredir_network_namespaces"] != 2 {
		t.Errorf("with the deployed capabilities: up %v, following %v namespaces; want 1 and 2 (the node's and the pod's)",
			m["sockredir_up"], m["sockredir_network_namespaces"])
	}
	var want uint64
	for _, c := range deployedCapabilities {
		want |= 1 << c
	}
	if got := d.effectiveCapabilities(); got != want {
		t.Errorf("the daemon's effective capabilities are %#x, want %#x (only the deployed ones)", got, want)
	}
}

// effectiveCapabilities reads the daemon's CapEff from /proc.
func (d *daemonProcess) effectiveCapabilities() uint64 {
	d.t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.cmd.Process.Pid))
	if err != nil {
		d.t.Fatal(err)
	}
	for line := range strings.Lines(string(status)) {
		if hex, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
			if err != nil {
				d.t.Fatal(err)
			}
			return caps
		}
	}
	d.t.Fatal("no CapEff in the daemon's /proc status")
	return 0
}

// startAsOtherUser runs a command as uid and gid 12345 in the pod's
// namespace and the test's cgroup until the test ends.
func startAsOtherUser(t *testing.T, e *harness.Env, pod *harness.Pod, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 12345, Gid: 12345}}
	p := harness.StartProcess(t, pod.NS, &sandbox.Cgroup{Path: e.Cgroup}, cmd)
	t.Cleanup(func() {
		cmd.Process.Kill() // by pid: the process this test started
		<-p.Done()
	})
}

// The daemon's upkeep: a reader that stops reading puts its connection back
// on TCP, which holds the sender back, also after `down` and a SIGHUP have
// brought the datapath back with new maps.
func TestDaemonHoldsBackSlowReaders(t *testing.T) {
	e := harness.New(t)
	d := startDaemon(t, e, "--config", noProbationConfig(t), "--max-backlog", "1048576", "--check-interval", "10ms",
		"--rescan-interval", "100ms")
	slowReader := func(seed uint64) {
		t.Helper()
		tr := slowReaderTransfer(seed)
		var res harness.TransferResult
		e.Run(harness.Scenario{Transfer: &tr}, &res)
		tr.Check(t, &res)
		if m := d.scrape(); m["sockredir_inbound_refused_total"] != 1 || m["sockredir_passed_bytes_total"] == 0 {
			t.Errorf("inbound_refused_total %v, passed_bytes_total %v, redirected_bytes_total %v, sockets_added_total %v; "+
				"want one refusal and bytes over TCP\n%s", m["sockredir_inbound_refused_total"], m["sockredir_passed_bytes_total"],
				m["sockredir_redirected_bytes_total"], m["sockredir_sockets_added_total"], d.log())
		}
	}
	slowReader(31)

	if _, err := datapath.Down(datapath.DownOptions{PinDir: e.PinDir}); err != nil {
		t.Fatal(err)
	}
	d.waitLog("the datapath was taken down: checks resume once `sockredir up` or a reload (SIGHUP) brings it back", nil)
	time.Sleep(500 * time.Millisecond) // rescans, each handing the addresses over
	if strings.Contains(d.log(), "could not update the datapath's local addresses") {
		t.Errorf("the address tracker reports the datapath taken down as an error:\n%s", d.log())
	}
	d.signal(syscall.SIGHUP)
	d.waitLog("the datapath was brought up again with new maps; looking after those", nil)
	slowReader(33) // the new maps' counters start at 0
	if m := d.scrape(); m["sockredir_upkeep_checks_total"] == 0 || m["sockredir_upkeep_failures_total"] != 0 {
		t.Errorf("upkeep checks %v, failures %v; want checks and no failures",
			m["sockredir_upkeep_checks_total"], m["sockredir_upkeep_failures_total"])
	}

	d.signal(syscall.SIGTERM)
	if code := d.wait(); code != 0 {
		t.Fatalf("the daemon exited with %d on SIGTERM:\n%s", code, d.log())
	}
}

// A daemon started with another --map-size than the datapath that is up
// has keeps that datapath's size and says so, rather than leave it without
// its upkeep.
func TestDaemonKeepsTheMapSize(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{MapSize: 4})
	d := startDaemon(t, e, "--map-size", "8")
	d.waitLog("keeping the map size of the datapath that is up", nil)
	d.waitLog("daemon running", nil)
	if st := e.Status(); !st.Up || st.MapSize != 4 {
		t.Errorf("up %v, map size %d; want up, 4", st.Up, st.MapSize)
	}
	d.signal(syscall.SIGTERM)
	if code := d.wait(); code != 0 {
		t.Fatalf("the daemon exited with %d on SIGTERM:\n%s", code, d.log())
	}
}

// SIGTERM ends a daemon whose start waits for another up or down of its pin
// directory, with nothing attached.
func TestDaemonStopsWaitingOnSIGTERM(t *testing.T) {
	e := harness.New(t)
	checkStopsWaiting(t, e, syscall.SIGTERM, "daemon", "--cgroup", e.Cgroup, "--pin-dir", e.PinDir)
}
