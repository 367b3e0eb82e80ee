package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// column is one run of the command: natively on the host or in one VM.
type column struct {
	Name    string  `json:"name"`              // the kernel release, or "host"
	Kernel  string  `json:"kernel"`            // `uname -r` where the command ran
	Package string  `json:"package,omitempty"` // Debian package the VM booted
	Result  string  `json:"result"`            // "ok", or why the run failed
	Seconds float64 `json:"seconds"`
	Log     string  `json:"log,omitempty"`
	console *consoleReport
}

const resultOK = "ok"

func (c *column) failed() bool {
	return c.Result != resultOK || c.console.anyFailed()
}

// runInVM boots the newest kernel matching pattern and runs the command
// in it. Problems are reported in the column, never returned, so the
// other kernels still run.
func runInVM(opts *options, pattern string) *column {
	col := &column{Name: pattern, console: &consoleReport{}}
	start := time.Now()
	defer func() { finishColumn(col, start, opts.verbose) }()

	pkg, err := resolvePackage(pattern)
	if err != nil {
		col.Result = "error: " + err.Error()
		return col
	}
	col.Name, col.Package = pkg, pkg
	k, err := prepareKernel(opts.cacheDir, pkg, opts.modules)
	if err != nil {
		col.Result = "error: " + err.Error()
		return col
	}
	col.Name, col.Kernel = k.release, k.release
	col.Log = filepath.Join(opts.logDir, k.release+".log")
	col.Result = boot(k, opts, col)
	if why := col.console.whyBootAgain(col.Result); why != "" {
		bootAgain(k, opts, col, why)
	}
	return col
}

// whyBootAgain says why a run that ended with result did not produce
// test results, so that the kernel deserves a second boot; "" if it did.
func (r *consoleReport) whyBootAgain(result string) string {
	switch {
	case result == resultOK || r.exited:
		return ""
	case len(r.tests) == 0:
		// The guest died or hung before the first test started, before
		// any of our code ran: an emulated boot can fail under load. Seen
		// on 6.1 as a guest that printed its release and then nothing,
		// not even when its own timeout should have fired.
		return "before the first test started"
	case r.patchTrap:
		// The guest kernel died of an int3 trap: the breakpoint that
		// text_poke_bp puts in while it patches code, hit after the
		// patching had finished. Multi-threaded TCG did that (the
		// runner now uses one thread); a real CPU doesn't.
		return "after an int3 trap at a code patching site"
	}
	return ""
}

// bootAgain boots k a second time, after the first boot ended as why says;
// the first console is kept beside the log.
func bootAgain(k *kernel, opts *options, col *column, why string) {
	first := col.Log + ".first-boot"
	if err := os.Rename(col.Log, first); err != nil {
		return
	}
	fmt.Printf("== %s: %s %s (console in %s); booting again\n", k.release, col.Result, why, first)
	col.Result = boot(k, opts, col)
}

// boot runs the command in a VM of kernel k, fills col.console from the
// console and returns the run's result.
func boot(k *kernel, opts *options, col *column) (result string) {
	initrd, err := os.CreateTemp("", "sockredir-initramfs-*.cpio.gz")
	if err != nil {
		return "error: " + err.Error()
	}
	initrd.Close()
	defer os.Remove(initrd.Name())
	if err := buildInitramfs(initrd.Name(), k, opts); err != nil {
		return "error: initramfs: " + err.Error()
	}

	fmt.Printf("== %s: booting %s under qemu (TCG)\n", k.release, k.pkg)
	ctx, cancel := context.WithTimeout(context.Background(), opts.timeout)
	defer cancel()
	ctx, noTestYet := context.WithCancelCause(ctx)
	defer noTestYet(nil)
	go watchFirstTest(ctx, col.Log, opts.startTimeout, noTestYet)
	qemu := exec.CommandContext(ctx, "qemu-system-x86_64",
		// KVM is not usable on our machines. One TCG thread for both
		// vCPUs: with one thread each, a vCPU can run code that another
		// has just patched (text_poke_bp's int3) and the guest dies of
		// an int3 Oops when BPF trampolines come and go (docs/kernels.md).
		"-accel", "tcg,thread=single",
		"-m", "2048", "-smp", "2",
		// Like -nographic, but without SeaBIOS's terminal-reset escapes
		// in the console.
		"-display", "none", "-serial", "stdio", "-monitor", "none",
		"-no-reboot",
		"-nic", "none", // tests only need loopback and veth in the guest
		"-kernel", k.vmlinuz,
		"-initrd", initrd.Name(),
		// no_timer_check: under emulation on a busy host the IO-APIC
		// timer check can time out and panic the boot.
		"-append", "console=ttyS0 panic=-1 quiet no_timer_check")
	qemuErr := runLogged(qemu, col.Log, opts.verbose)
	timedOut := ctx.Err() != nil
	noTest := errors.Is(context.Cause(ctx), errNoTestYet)
	console, err := parseConsoleFile(col.Log)
	if err != nil {
		return "error: " + err.Error()
	}
	col.console = console
	if console.release != "" {
		col.Name, col.Kernel = console.release, console.release
	}
	switch {
	case noTest:
		return fmt.Sprintf("no test started within %s", opts.startTimeout)
	case timedOut:
		return fmt.Sprintf("timeout after %s", opts.timeout)
	case !console.exited && qemuErr != nil:
		return "qemu failed: " + qemuErr.Error()
	case !console.exited:
		return "no exit marker (guest crashed?)"
	case console.exitCode == setupFailedExit:
		return "VM setup failed"
	case console.exitCode != 0:
		return fmt.Sprintf("exit %d", console.exitCode)
	}
	return resultOK
}

// errNoTestYet stops a guest that started no test within --start-timeout.
var errNoTestYet = errors.New("no test started")

// watchFirstTest stops the VM (stop) unless its console (log) shows a test
// starting within limit: a guest kernel stuck while booting would otherwise
// use up the whole time limit before it is booted again.
func watchFirstTest(ctx context.Context, log string, limit time.Duration, stop context.CancelCauseFunc) {
	select {
	case <-ctx.Done():
	case <-time.After(limit):
		if console, err := os.ReadFile(log); err == nil && !currentTestLine.Match(console) {
			stop(errNoTestYet)
		}
	}
}

// runOnHost runs the command natively, with each --bin's VM path
// (/bin/NAME) in the command's first word mapped back to the host file.
func runOnHost(opts *options) *column {
	col := &column{Name: "host", Kernel: hostRelease(), console: &consoleReport{}}
	start := time.Now()
	defer func() { finishColumn(col, start, opts.verbose) }()

	argv := append([]string(nil), opts.command...)
	for _, bin := range opts.bins {
		if argv[0] == "/bin/"+filepath.Base(bin) {
			if abs, err := filepath.Abs(bin); err == nil {
				argv[0] = abs
			}
		}
	}
	fmt.Printf("== host (%s): running %s\n", col.Kernel, strings.Join(argv, " "))
	col.Log = filepath.Join(opts.logDir, "host.log")
	ctx, cancel := context.WithTimeout(context.Background(), opts.timeout)
	defer cancel()
	command := exec.CommandContext(ctx, argv[0], argv[1:]...)
	command.Env = append(os.Environ(), opts.env...)
	runErr := runLogged(command, col.Log, opts.verbose)
	timedOut := ctx.Err() != nil
	console, err := parseConsoleFile(col.Log)
	if err != nil {
		col.Result = "error: " + err.Error()
		return col
	}
	col.console = console
	var exitErr *exec.ExitError
	switch {
	case timedOut:
		col.Result = fmt.Sprintf("timeout after %s", opts.timeout)
	case errors.As(runErr, &exitErr):
		col.Result = fmt.Sprintf("exit %d", exitErr.ExitCode())
	case runErr != nil:
		col.Result = "error: " + runErr.Error()
	default:
		col.Result = resultOK
	}
	return col
}

// runLogged runs cmd with its output going to logPath (and stdout if
// verbose). Commands come from exec.CommandContext: when their context's
// timeout hits, only the process started here is killed, by its pid.
func runLogged(cmd *exec.Cmd, logPath string, verbose bool) error {
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	var output io.Writer = logFile
	if verbose {
		output = io.MultiWriter(logFile, os.Stdout)
	}
	cmd.Stdin = nil // /dev/null: keeps qemu's serial console off the terminal
	cmd.Stdout = output
	cmd.Stderr = output
	cmd.WaitDelay = 10 * time.Second // don't hang on pipes a child kept open
	return cmd.Run()
}

// finishColumn records the duration and reports the run. On failure the
// whole console is printed unless --v already streamed it: it is the only
// trace of what the guest did.
func finishColumn(col *column, start time.Time, outputShown bool) {
	col.Seconds = time.Since(start).Seconds()
	fmt.Printf("== %s: %s in %.1fs\n", col.Name, col.Result, col.Seconds)
	if !col.failed() || col.Log == "" || outputShown {
		return
	}
	console, err := os.ReadFile(col.Log)
	if err != nil {
		fmt.Printf("cannot read %s: %v\n", col.Log, err)
		return
	}
	fmt.Printf("---- output of %s (%s) ----\n%s\n---- end of output of %s ----\n",
		col.Name, col.Log, strings.TrimRight(string(console), "\n"), col.Name)
}

// failedTailLines is how much of a failed column's log is repeated after
// the matrix: CI pages often show only the end of a long output.
const failedTailLines = 40

func printLogTail(col *column, lines int) {
	if col.Log == "" {
		return
	}
	log, err := os.ReadFile(col.Log)
	if err != nil {
		return
	}
	all := strings.Split(strings.TrimRight(string(log), "\n"), "\n")
	fmt.Printf("\n---- %s (%s), last %d lines of %s ----\n%s\n",
		col.Name, col.Result, lines, col.Log, strings.Join(all[max(0, len(all)-lines):], "\n"))
}

func hostRelease() string {
	release, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(release))
}
