package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// agentEnv carries an agent's scenario, as JSON, to the re-executed binary.
const agentEnv = "SOCKREDIR_TEST_AGENT"

// Scenario is what an agent does; exactly one field is set.
type Scenario struct {
	Transfer *Transfer `json:"transfer,omitempty"`
	Case     *Case     `json:"case,omitempty"`
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
	done   chan error
	stdout bytes.Buffer
	stderr bytes.Buffer
}

// Start runs scenario s in an agent inside the test's cgroup and namespace.
// The agent is killed after timeout.
func (e *Env) Start(s Scenario, timeout time.Duration) *Agent {
	e.T.Helper()
	spec, err := json.Marshal(s)
	if err != nil {
		e.T.Fatal(err)
	}
	a := &Agent{done: make(chan error, 1)}
	started := make(chan error)
	// The whole life of the agent happens on one thread inside the
	// namespace: the child inherits its namespace, and Pdeathsig follows
	// the thread that started it.
	go func() {
		a.done <- e.NS.Do(func() error {
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), agentEnv+"="+string(spec))
			cmd.Stdout, cmd.Stderr = &a.stdout, &a.stderr
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			release, err := e.cgroup.Command(cmd)
			if err == nil {
				err = cmd.Start()
				release()
			}
			started <- err
			if err != nil {
				return err
			}
			if err := cmd.Wait(); err != nil {
				return fmt.Errorf("agent %s: %w\n%s", spec, err, a.stderr.String())
			}
			return nil
		})
	}()
	if err := <-started; err != nil {
		e.T.Fatalf("starting agent: %v", err)
	}
	return a
}

// Wait waits for the agent to finish and decodes its result.
func (a *Agent) Wait(result any) error {
	if err := <-a.done; err != nil {
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
