// Command kernels boots Debian kernels under qemu and runs sockredir's
// statically built test binaries inside them, then prints a matrix of
// test case × kernel (optionally with the host kernel as a column).
//
//	go run ./test/kernels --bin ./build/e2e.test --host -- /bin/e2e.test -test.v
//
// See README.md next to this file.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// defaultKernels are the kernels sockredir supports: Debian 12's own
// kernel and its backported newer one. Globs pick the newest match.
var defaultKernels = []string{
	"linux-image-6.1.0-*-cloud-amd64",
	"linux-image-6.12.*+deb12-cloud-amd64",
}

type options struct {
	kernels      []string
	bins         []string
	env          []string
	modules      []string
	host         bool
	timeout      time.Duration
	startTimeout time.Duration
	cacheDir     string
	logDir       string
	jsonPath     string
	markdownPath string
	verbose      bool
	command      []string
}

// stringList is a flag that may be given several times.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, " ") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

func parseFlags() (*options, error) {
	var opts options
	var kernels, bins, env stringList
	var modules string
	flag.Var(&kernels, "kernel", "Debian kernel package `name` or glob (newest match wins); repeatable (default: "+strings.Join(defaultKernels, ", ")+")")
	flag.Var(&bins, "bin", "static `binary` to copy into the VM as /bin/<basename>; repeatable")
	flag.Var(&env, "env", "`KEY=VALUE` to export before the command (VM and host); repeatable")
	flag.StringVar(&modules, "modules", "veth,bridge", "comma-separated kernel `modules` to load in the VM (dependencies are added)")
	flag.BoolVar(&opts.host, "host", false, "also run the command natively on the host, as the first column")
	flag.DurationVar(&opts.timeout, "timeout", 15*time.Minute, "per-kernel time limit, boot included")
	flag.DurationVar(&opts.startTimeout, "start-timeout", 5*time.Minute, "time a VM has to boot and start its first test")
	flag.StringVar(&opts.cacheDir, "cache", defaultCacheDir(), "`dir` for downloaded kernel packages and extracted kernels")
	flag.StringVar(&opts.logDir, "log-dir", filepath.Join("build", "kernel-logs"), "`dir` for one console log per kernel")
	flag.StringVar(&opts.jsonPath, "json", "", "write the matrix as JSON to `file`")
	flag.StringVar(&opts.markdownPath, "markdown", "", "write the matrix as a Markdown table to `file`")
	flag.BoolVar(&opts.verbose, "v", false, "stream each console to stdout while it runs")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: go run ./test/kernels [flags] -- COMMAND [ARGS...]\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()

	opts.kernels = kernels
	if len(opts.kernels) == 0 {
		opts.kernels = defaultKernels
	}
	opts.bins = bins
	opts.env = env
	for _, m := range strings.Split(modules, ",") {
		if m = strings.TrimSpace(m); m != "" {
			opts.modules = append(opts.modules, m)
		}
	}
	opts.command = flag.Args()
	if len(opts.command) == 0 {
		return nil, errors.New("no command given after --")
	}
	for _, kv := range opts.env {
		if err := checkEnvAssignment(kv); err != nil {
			return nil, err
		}
	}
	if opts.timeout <= 0 || opts.startTimeout <= 0 {
		return nil, errors.New("--timeout and --start-timeout must be positive")
	}
	return &opts, nil
}

func defaultCacheDir() string {
	dir, err := os.UserCacheDir() // $XDG_CACHE_HOME or ~/.cache
	if err != nil {
		dir = os.TempDir()
	}
	return filepath.Join(dir, "sockredir", "kernels")
}

// requiredTools maps each host command the VM runs need to the Debian
// package that provides it, so a missing one yields a useful message.
var requiredTools = []struct{ command, pkg string }{
	{"apt-get", "apt"},
	{"apt-cache", "apt"},
	{"dpkg-deb", "dpkg"},
	{"tar", "tar"},
	{"xz", "xz-utils"},
	{"busybox", "busybox-static"},
	{"qemu-system-x86_64", "qemu-system-x86"},
}

func checkTools() error {
	var missing, packages []string
	for _, tool := range requiredTools {
		if _, err := exec.LookPath(tool.command); err != nil {
			missing = append(missing, tool.command)
			packages = append(packages, tool.pkg)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing %s: install with: apt-get install -y %s",
			strings.Join(missing, ", "), strings.Join(packages, " "))
	}
	busybox, _ := exec.LookPath("busybox")
	if static, err := isStatic(busybox); err != nil || !static {
		return fmt.Errorf("%s is not a static binary (the VM has no libc): apt-get install -y busybox-static", busybox)
	}
	return nil
}

func main() {
	opts, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kernels:", err)
		flag.Usage()
		os.Exit(2)
	}
	ok, err := run(opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kernels:", err)
		os.Exit(2)
	}
	if !ok {
		os.Exit(1)
	}
}

// run runs the command on every column and reports; ok is false if any
// test failed or any run did not finish cleanly.
func run(opts *options) (ok bool, err error) {
	if err := checkTools(); err != nil {
		return false, err
	}
	for _, bin := range opts.bins {
		if static, err := isStatic(bin); err != nil {
			return false, err
		} else if !static {
			return false, fmt.Errorf("%s is dynamically linked; build it with CGO_ENABLED=0", bin)
		}
	}
	if err := os.MkdirAll(opts.logDir, 0o755); err != nil {
		return false, err
	}
	if err := os.MkdirAll(opts.cacheDir, 0o755); err != nil {
		return false, err
	}

	var columns []*column
	if opts.host {
		columns = append(columns, runOnHost(opts))
	}
	// One VM at a time: TCG is CPU-bound and the machine has two cores.
	for _, pattern := range opts.kernels {
		columns = append(columns, runInVM(opts, pattern))
	}

	m := newMatrix(columns)
	fmt.Println()
	m.writeText(os.Stdout)
	for _, col := range columns {
		if col.failed() {
			printLogTail(col, failedTailLines)
		}
	}
	if opts.jsonPath != "" {
		if err := writeFile(opts.jsonPath, m.writeJSON); err != nil {
			return false, err
		}
	}
	if opts.markdownPath != "" {
		if err := writeFile(opts.markdownPath, m.writeMarkdown); err != nil {
			return false, err
		}
	}
	return m.ok(), nil
}
