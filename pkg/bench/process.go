package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
)

// workerProc is a running worker process.
type workerProc struct {
	stdin     io.WriteCloser
	listening chan string
	done      chan struct{}
	report    *workerReport
	err       error
}

// startWorker starts a worker for j inside cfg's cgroup and the
// benchmark's namespace. The worker is killed when ctx ends.
func (e *env) startWorker(ctx context.Context, command []string, cfg Config, j job) (*workerProc, error) {
	spec, err := json.Marshal(j)
	if err != nil {
		return nil, err
	}
	wp := &workerProc{listening: make(chan string, 1), done: make(chan struct{})}
	started := make(chan error, 1)
	// The worker's whole life happens on one thread inside the namespace:
	// the child inherits the thread's namespace, and Pdeathsig follows the
	// thread that started it.
	go func() {
		defer close(wp.done)
		wp.err = e.ns.Do(func() error {
			cmd := exec.CommandContext(ctx, command[0], command[1:]...)
			cmd.Env = append(os.Environ(), jobEnv+"="+string(spec))
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				started <- err
				return err
			}
			if wp.stdin, err = cmd.StdinPipe(); err != nil {
				started <- err
				return err
			}
			release, err := e.cgroups[cfg].Command(cmd)
			if err == nil {
				err = cmd.Start()
				release()
			}
			started <- err
			if err != nil {
				return err
			}
			rep, readErr := readMessages(stdout, wp.listening)
			io.Copy(io.Discard, stdout)
			waitErr := cmd.Wait()
			if ctx.Err() != nil {
				return fmt.Errorf("%s worker stopped: %w", j.Role, context.Cause(ctx))
			}
			if waitErr != nil {
				return fmt.Errorf("%s worker: %v: %s", j.Role, waitErr, strings.TrimSpace(stderr.String()))
			}
			wp.report = rep
			return readErr
		})
		if wp.err != nil {
			// Do fails before fn runs when the namespace can't be
			// entered; then fn never said whether the worker started.
			select {
			case started <- wp.err:
			default:
			}
		}
	}()
	if err := <-started; err != nil {
		<-wp.done
		return nil, fmt.Errorf("starting a %s worker (%s): %w", j.Role, command[0], err)
	}
	return wp, nil
}

// address waits for a server worker to listen and returns what to dial.
func (wp *workerProc) address(ctx context.Context) (string, error) {
	select {
	case addr := <-wp.listening:
		return addr, nil
	case <-wp.done:
		if wp.err == nil {
			wp.err = errors.New("the server worker exited before listening")
		}
		return "", wp.err
	case <-ctx.Done():
		return "", context.Cause(ctx)
	}
}

// stop tells a server worker that the client is done.
func (wp *workerProc) stop() { wp.stdin.Close() }

// wait waits for the worker to exit and returns its report.
func (wp *workerProc) wait() (*workerReport, error) {
	<-wp.done
	return wp.report, wp.err
}
