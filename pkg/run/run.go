// Package run is `sockredir run`: it accelerates one command and its
// children, and nothing else. The command runs in a transient cgroup with a
// datapath of its own, kept up as the daemon keeps its own
// (datapath.Maintainer); when it ends, the datapath goes down and the cgroup
// and pins are removed.
package run

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/hostfs"
	"github.com/sockredir/sockredir/pkg/policy"
	"github.com/sockredir/sockredir/pkg/sandbox"
)

// Exit statuses of run's own failures, as env(1), timeout(1) and docker run
// use them, so that they can't be mistaken for the command's own.
const (
	ExitFailed        = 125 // sockredir could not set up, or clean up
	ExitCannotExecute = 126 // the command was found but could not be started
	ExitNotFound      = 127 // the command was not found
)

// ForwardedSignals are the signals to catch and pass on to the command.
var ForwardedSignals = []os.Signal{unix.SIGINT, unix.SIGTERM, unix.SIGHUP, unix.SIGQUIT, unix.SIGUSR1, unix.SIGUSR2}

// Options say what to run.
type Options struct {
	// Command is the program and its arguments.
	Command []string
	// MapSize, PassOnly and Policy are those of datapath.Config.
	MapSize  uint32
	PassOnly bool
	Policy   *policy.Policy
	// MaxBacklog is the upkeep's backlog limit (datapath.NewMaintainer).
	MaxBacklog uint64
	// Stdin, Stdout and Stderr are the command's.
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// Signals received are passed on to the command (see ForwardedSignals).
	Signals <-chan os.Signal
	// Log receives what run does; nil means no logging.
	Log *zap.Logger
}

// Run runs the command accelerated and returns the exit status to exit
// with: the command's, or 128 plus the signal that killed it. On an error
// of its own it returns one of the Exit constants.
func Run(opts Options) (int, error) {
	log := opts.Log
	if log == nil {
		log = zap.NewNop()
	}
	if len(opts.Command) == 0 {
		return ExitFailed, errors.New("no command given: sockredir run -- COMMAND [ARGS...]")
	}
	// Checked first: without privileges, creating the cgroup would fail
	// with a less helpful message.
	if err := datapath.CheckPrivileges(); err != nil {
		return ExitFailed, err
	}
	cg, err := sandbox.NewCgroup("sockredir-run-")
	if err != nil {
		return ExitFailed, err
	}
	pinDir := filepath.Join(hostfs.DefaultBPFFS, filepath.Base(cg.Path))
	cfg := datapath.Config{
		Cgroup: cg.Path, PinDir: pinDir, MapSize: opts.MapSize, PassOnly: opts.PassOnly, Policy: opts.Policy,
		// Only warnings: the command's output is what the user is after.
		Log: log.WithOptions(zap.IncreaseLevel(zap.WarnLevel)),
	}
	if _, err := datapath.Up(cfg); err != nil {
		return ExitFailed, errors.Join(err, removeCgroup(cg))
	}
	maintainer, err := datapath.NewMaintainer(pinDir, opts.MaxBacklog)
	if err != nil {
		return ExitFailed, errors.Join(err, cleanUp(cg, cfg, log))
	}
	ctx, stopUpkeep := context.WithCancel(context.Background())
	upkeepDone := make(chan struct{})
	go func() {
		defer close(upkeepDone)
		maintainer.Run(ctx, 0, func(res datapath.CheckResult, err error) { res.WarnAbout(log, err) })
	}()

	code, runErr := runCommand(cg, opts)
	stopUpkeep()
	<-upkeepDone
	if u, err := datapath.ReadUsage(pinDir); err == nil && runErr == nil {
		log.Info("sockredir run: done", zap.Int("exit_status", code), zap.Uint64("sockets_added", u.Counters.SocketsAdded),
			zap.Uint64("bytes_redirected", u.Counters.BytesRedirected), zap.Uint64("bytes_passed", u.Counters.BytesPassed))
	}
	if err := cleanUp(cg, cfg, log); err != nil {
		return ExitFailed, errors.Join(runErr, err)
	}
	return code, runErr
}

// runCommand starts the command inside the cgroup, passes signals on to it
// and waits for it.
func runCommand(cg *sandbox.Cgroup, opts Options) (int, error) {
	// Pdeathsig follows the thread that started the child: it stays
	// locked until the child is gone. If sockredir itself is killed, the
	// command goes with it rather than run on in a cgroup nobody removes.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cmd := exec.Command(opts.Command[0], opts.Command[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = opts.Stdin, opts.Stdout, opts.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	release, err := cg.Command(cmd)
	if err != nil {
		return ExitFailed, err
	}
	err = cmd.Start()
	release()
	if err != nil {
		code := ExitCannotExecute
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
			code = ExitNotFound
		}
		return code, fmt.Errorf("starting %s: %w", opts.Command[0], err)
	}

	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case sig := <-opts.Signals:
				if !reachedCommandAlready(sig) {
					cmd.Process.Signal(sig)
				}
			case <-done:
				return
			}
		}
	}()
	err = cmd.Wait()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		return ExitFailed, fmt.Errorf("waiting for %s: %w", opts.Command[0], err)
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal()), nil
	}
	return cmd.ProcessState.ExitCode(), nil
}

// reachedCommandAlready reports whether sig most likely came from the
// terminal, which sends SIGINT, SIGQUIT and SIGHUP to its whole foreground
// process group: when sockredir is in that group, so is the command, and
// passing the signal on would deliver it twice.
func reachedCommandAlready(sig os.Signal) bool {
	if sig != unix.SIGINT && sig != unix.SIGQUIT && sig != unix.SIGHUP {
		return false
	}
	for fd := range 3 {
		if pgrp, err := unix.IoctlGetInt(fd, unix.TIOCGPGRP); err == nil {
			return pgrp == unix.Getpgrp()
		}
	}
	return false
}

// cleanUp ends whatever the command left running in the cgroup, takes the
// datapath down and removes the cgroup.
func cleanUp(cg *sandbox.Cgroup, cfg datapath.Config, log *zap.Logger) error {
	if left, err := killLeftovers(cg); err != nil {
		log.Warn("could not end the processes the command left behind", zap.Error(err))
	} else if left > 0 {
		log.Warn("the command left processes running in its cgroup; they were killed", zap.Int("processes", left))
	}
	_, downErr := datapath.Down(datapath.DownOptions{PinDir: cfg.PinDir, Log: cfg.Log})
	if downErr != nil {
		downErr = fmt.Errorf("taking down the datapath of %s: %w (`sockredir down --pin-dir %s` retries)",
			cg.Path, downErr, cfg.PinDir)
	}
	return errors.Join(downErr, removeCgroup(cg))
}

// killLeftovers kills every process still in the cgroup (cgroup.kill) and
// reports how many there were.
func killLeftovers(cg *sandbox.Cgroup) (int, error) {
	procs, err := os.ReadFile(filepath.Join(cg.Path, "cgroup.procs"))
	if err != nil {
		return 0, err
	}
	left := len(strings.Fields(string(procs)))
	if left == 0 {
		return 0, nil
	}
	return left, os.WriteFile(filepath.Join(cg.Path, "cgroup.kill"), []byte("1"), 0)
}

func removeCgroup(cg *sandbox.Cgroup) error {
	if err := cg.Remove(10 * time.Second); err != nil {
		return fmt.Errorf("%w (remove it with rmdir once its processes are gone)", err)
	}
	return nil
}
