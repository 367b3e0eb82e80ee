package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/policy"
	"github.com/sockredir/sockredir/pkg/sandbox"
)

// config is how the tools' bytes travel.
type config string

const (
	tcp       config = "tcp"       // plain TCP over loopback
	sockredir config = "sockredir" // the same, accelerated
	unixSock  config = "unix"      // AF_UNIX, where the tool has it
)

// env is the app benchmark's sandbox: a network namespace, a cgroup with
// sockredir attached and one without, and a scratch directory.
type env struct {
	ns     *sandbox.Netns
	plain  *sandbox.Cgroup
	accel  *sandbox.Cgroup
	pinDir string
	dir    string
}

func newEnv() (_ *env, err error) {
	e := &env{pinDir: "/sys/fs/bpf/sockredir-apps-" + sandbox.RandomSuffix()}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	if e.dir, err = os.MkdirTemp("", "sockredir-apps-"); err != nil {
		return nil, err
	}
	// nginx's workers run as nobody and read the files served from here.
	if err := os.Chmod(e.dir, 0o755); err != nil {
		return nil, err
	}
	if e.ns, err = sandbox.NewNetns(); err != nil {
		return nil, err
	}
	if e.plain, err = sandbox.NewCgroup("sockredir-apps-plain-"); err != nil {
		return nil, err
	}
	if e.accel, err = sandbox.NewCgroup("sockredir-apps-accel-"); err != nil {
		return nil, err
	}
	// The tools' servers read with recv(2) from non-blocking sockets, and
	// their ports clear on probation (TestApp*/defaults); here probation
	// would only hold each run's first connections on TCP.
	noProbation := &policy.Policy{Redirect: policy.Redirect{AccelerateNewPorts: true}}
	return e, e.ns.Do(func() error {
		_, err := datapath.Up(datapath.Config{Cgroup: e.accel.Path, PinDir: e.pinDir, Policy: noProbation})
		return err
	})
}

// close detaches sockredir and removes everything newEnv made. The tools'
// processes must have exited.
func (e *env) close() error {
	var errs []error
	if _, err := datapath.Down(datapath.DownOptions{PinDir: e.pinDir, DrainTimeout: 10 * time.Second}); err != nil {
		errs = append(errs, err)
	}
	for _, cg := range []*sandbox.Cgroup{e.plain, e.accel} {
		if cg != nil {
			errs = append(errs, cg.Remove(10*time.Second))
		}
	}
	if e.ns != nil {
		e.ns.Close()
	}
	if e.dir != "" {
		errs = append(errs, os.RemoveAll(e.dir))
	}
	return errors.Join(errs...)
}

// cgroup is where cfg's processes run: AF_UNIX and plain TCP share the one
// without sockredir.
func (e *env) cgroup(cfg config) *sandbox.Cgroup {
	if cfg == sockredir {
		return e.accel
	}
	return e.plain
}

func (e *env) counters() (datapath.Counters, error) {
	st, err := datapath.ReadStatus(e.pinDir)
	return st.Counters, err
}

// proc is a tool's process, started by start.
type proc struct {
	name   string
	cmd    *exec.Cmd
	output bytes.Buffer // stdout and stderr
	done   chan struct{}
	err    error
}

// start runs argv inside cfg's cgroup and the namespace; it is killed when
// ctx ends.
func (e *env) start(ctx context.Context, cfg config, argv ...string) (*proc, error) {
	p := &proc{name: filepath.Base(argv[0]), done: make(chan struct{})}
	started := make(chan error, 1)
	// The process's whole life happens on one thread inside the namespace:
	// it inherits the thread's namespace, and Pdeathsig follows the thread.
	go func() {
		defer close(p.done)
		p.err = e.ns.Do(func() error {
			p.cmd = exec.CommandContext(ctx, argv[0], argv[1:]...)
			p.cmd.Stdout, p.cmd.Stderr = &p.output, &p.output
			// On cancellation: SIGTERM, then SIGKILL if it is still there
			// after stopGrace; a child that kept the output pipe open
			// can't make Wait hang.
			p.cmd.Cancel = func() error { return p.cmd.Process.Signal(syscall.SIGTERM) }
			p.cmd.WaitDelay = stopGrace
			p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			release, err := e.cgroup(cfg).Command(p.cmd)
			if err == nil {
				err = p.cmd.Start()
				release()
			}
			started <- err
			if err != nil {
				return err
			}
			return p.cmd.Wait()
		})
	}()
	if err := <-started; err != nil {
		<-p.done
		return nil, fmt.Errorf("starting %s: %w", p.name, err)
	}
	return p, nil
}

// run runs argv to the end and returns its output.
func (e *env) run(ctx context.Context, cfg config, argv ...string) (string, error) {
	p, err := e.start(ctx, cfg, argv...)
	if err != nil {
		return "", err
	}
	<-p.done
	if p.err != nil {
		return p.output.String(), fmt.Errorf("%s: %v: %s", p.name, p.err, lastLines(p.output.String(), 5))
	}
	return p.output.String(), nil
}

// stopGrace is how long a server has to exit after SIGTERM.
const stopGrace = 5 * time.Second

// stop ends a server this program started, by its pid: SIGTERM, so that it
// ends its own children too, then SIGKILL after stopGrace.
func (p *proc) stop() {
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(stopGrace):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// waitListening waits until a TCP socket in the namespace listens on port,
// or until the unix socket path exists. It does not connect: a connection
// from this process would be one more client in the measurements.
func (e *env) waitListening(ctx context.Context, server *proc, port int, path string) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		var listening bool
		if err := e.ns.Do(func() error {
			listening = tcpListening(port) && (path == "" || exists(path))
			return nil
		}); err != nil {
			return err
		}
		if listening {
			return nil
		}
		select {
		case <-server.done:
			return fmt.Errorf("%s exited before listening: %s", server.name, lastLines(server.output.String(), 5))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s is not listening on port %d after 10s: %s", server.name, port, lastLines(server.output.String(), 5))
}

// tcpListening reads the calling thread's namespace's socket table.
func tcpListening(port int) bool {
	want := fmt.Sprintf(":%04X ", port)
	for _, table := range []string{"/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"} {
		f, err := os.Open(table)
		if err != nil {
			continue
		}
		s := bufio.NewScanner(f)
		for s.Scan() {
			fields := strings.Fields(s.Text())
			// local_address is field 1, st is field 3; 0A is LISTEN.
			if len(fields) > 3 && strings.HasSuffix(fields[1]+" ", want) && fields[3] == "0A" {
				f.Close()
				return true
			}
		}
		f.Close()
	}
	return false
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], " | ")
}
