package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/sockredir/sockredir/pkg/sandbox"
)

// agentEnv carries an agent's scenario, as JSON, to the re-executed binary.
const agentEnv = "SOCKREDIR_TEST_AGENT"

// Scenario is what an agent does; exactly one field is set.
type Scenario struct {
	Transfer *Transfer `json:"transfer,omitempty"`
	Case     *Case     `json:"case,omitempty"`
	Pod      *PodAgent `json:"pod,omitempty"`
}

// MaybeRunAgent must be called first in TestMain: when this process was
// started as an agent it runs the scenario, prints the result as JSON and
// exits; otherwise it returns.
func MaybeRunAgent() {
	spec := os.Getenv(agentEnv)
	if spec == "" {
		return
	}
	var s Scenario
	var result any
	err := json.Unmarshal([]byte(spec), &s)
	if err == nil {
		switch {
		case s.Transfer != nil:
			result, err = s.Transfer.Run()
		case s.Case != nil:
			result, err = s.Case.Run()
		case s.Pod != nil:
			result, err = s.Pod.Run()
		default:
			err = fmt.Errorf("empty scenario %s", spec)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(result); err != nil {
		os.Exit(1)
	}
	os.Exit(0)
}

// Agent is a running agent process.
type Agent struct {
	*Process
}

// Start runs scenario s in an agent inside the test's cgroup and namespace.
// The agent is killed after timeout, or when the test ends.
func (e *Env) Start(s Scenario, timeout time.Duration) *Agent {
	e.T.Helper()
	return e.StartIn(e.NS, s, timeout)
}

// StartIn is Start in another namespace (still in the test's cgroup).
func (e *Env) StartIn(ns *sandbox.Netns, s Scenario, timeout time.Duration) *Agent {
	e.T.Helper()
	spec, err := json.Marshal(s)
	if err != nil {
		e.T.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), agentEnv+"="+string(spec))
	a := &Agent{Process: StartProcess(e.T, ns, e.cgroup, cmd)}
	go func() {
		<-a.Done()
		cancel()
	}()
	// Before the datapath and the cgroup go: a test that failed early
	// would otherwise leave its agent holding both until the timeout.
	e.T.Cleanup(func() {
		cancel() // kills the agent by pid if it still runs
		a.Process.Wait()
	})
	return a
}

// Process is a command started by StartProcess.
type Process struct {
	Cmd    *exec.Cmd
	done   chan struct{} // closed when the process has ended; err is set then
	err    error
	stdout bytes.Buffer
	stderr bytes.Buffer
}

// StartCommand starts cmd inside the test's cgroup and namespace; it is
// killed when the test ends.
func (e *Env) StartCommand(cmd *exec.Cmd) *Process {
	e.T.Helper()
	p := StartProcess(e.T, e.NS, e.cgroup, cmd)
	e.T.Cleanup(func() {
		p.Cmd.Process.Kill() // by pid: only the process this test started
		p.Wait()
	})
	return p
}

// StartProcess starts cmd in namespace ns and, unless cg is nil, in cgroup
// cg (from its first instruction). Stopping it is the caller's business.
// cmd's SysProcAttr settings are kept; Pdeathsig is added.
func StartProcess(t testing.TB, ns *sandbox.Netns, cg *sandbox.Cgroup, cmd *exec.Cmd) *Process {
	t.Helper()
	p := &Process{Cmd: cmd, done: make(chan struct{})}
	if cmd.Stdout == nil {
		cmd.Stdout = &p.stdout
	}
	if cmd.Stderr == nil {
		cmd.Stderr = &p.stderr
	}
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	started := make(chan error)
	// The process's whole life happens on one thread inside the namespace:
	// the child inherits its namespace, and Pdeathsig follows the thread
	// that started it.
	go func() {
		defer close(p.done)
		p.err = ns.Do(func() error {
			release := func() {}
			var err error
			if cg != nil {
				release, err = cg.Command(cmd)
			}
			if err == nil {
				err = cmd.Start()
				release()
			}
			started <- err
			if err != nil {
				return err
			}
			if err := cmd.Wait(); err != nil {
				return fmt.Errorf("%s: %w\n%s", cmd.Path, err, p.stderr.String())
			}
			return nil
		})
	}()
	if err := <-started; err != nil {
		t.Fatalf("starting %s: %v", cmd.Path, err)
	}
	return p
}

// Done is closed when the process has ended.
func (p *Process) Done() <-chan struct{} { return p.done }

// Wait waits for the process to end.
func (p *Process) Wait() error {
	<-p.done
	return p.err
}

// Output is what the process printed on stdout.
func (p *Process) Output() string { return p.stdout.String() }

// Wait waits for the agent to finish and decodes its result.
func (a *Agent) Wait(result any) error {
	if err := a.Process.Wait(); err != nil {
		return err
	}
	if err := json.Unmarshal(a.stdout.Bytes(), result); err != nil {
		return fmt.Errorf("agent result %q: %w", a.stdout.String(), err)
	}
	return nil
}

// Run runs scenario s in an agent and decodes its result, failing the test
// if the agent fails.
func (e *Env) Run(s Scenario, result any) {
	e.T.Helper()
	if err := e.Start(s, 5*time.Minute).Wait(result); err != nil {
		e.T.Fatal(err)
	}
}
