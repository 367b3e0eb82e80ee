package main

import (
	"bufio"
	"compress/gzip"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"text/template"
	"time"
)

// Markers /init prints so the host can parse the console.
const (
	unameMarker = "SOCKREDIR-UNAME"
	exitMarker  = "SOCKREDIR-EXIT"
)

// setupFailedExit is the exit code /init reports when it could not
// prepare the VM (mounts, modules) and so never ran the command.
const setupFailedExit = 125

// initScript is PID 1 of the VM. Every mount a test might rely on is
// mandatory except debugfs and tracefs, which not every kernel has.
var initScript = template.Must(template.New("init").Parse(`#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin

setup_failed() {
	echo "SOCKREDIR-SETUP-FAILED: $*"
	echo "` + exitMarker + ` {{.SetupFailedExit}}"
	poweroff -f
}

mount -t proc proc /proc || setup_failed mount proc
mount -t sysfs sysfs /sys || setup_failed mount sysfs
mount -t devtmpfs devtmpfs /dev || setup_failed mount devtmpfs
mount -t cgroup2 cgroup2 /sys/fs/cgroup || setup_failed mount cgroup2
mount -t bpf bpf /sys/fs/bpf || setup_failed mount bpffs
mount -t securityfs securityfs /sys/kernel/security || setup_failed mount securityfs
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
ip link set lo up || setup_failed ip link set lo up
{{range .Modules}}insmod {{.}} || setup_failed insmod {{.}}
{{end}}
echo "` + unameMarker + ` $(uname -r)"
export CI=true
{{range .Env}}export {{.}}
{{end}}cd /tmp
timeout {{.TimeoutSeconds}} {{.Command}}
echo "` + exitMarker + ` $?"
poweroff -f
`))

type initParams struct {
	Modules         []string // paths inside the VM
	Env             []string // KEY='quoted value'
	TimeoutSeconds  int
	Command         string // shell-quoted
	SetupFailedExit int
}

// buildInitramfs writes a gzipped newc cpio archive with busybox, the
// kernel's modules, the test binaries (as /bin/<basename>) and /init.
// The archive is written in Go so that device nodes need no root and no
// cpio tool is required.
func buildInitramfs(file string, k *kernel, opts *options) error {
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		return err
	}
	params := initParams{
		TimeoutSeconds:  guestTimeoutSeconds(opts.timeout),
		Command:         shellQuoteAll(opts.command),
		SetupFailedExit: setupFailedExit,
	}
	for _, kv := range opts.env {
		key, value, _ := strings.Cut(kv, "=")
		params.Env = append(params.Env, key+"="+shellQuote(value))
	}
	for _, ko := range k.modules {
		params.Modules = append(params.Modules, "/lib/modules/"+filepath.Base(ko))
	}
	var script strings.Builder
	if err := initScript.Execute(&script, params); err != nil {
		return err
	}

	out, err := os.Create(file)
	if err != nil {
		return err
	}
	defer out.Close()
	buffered := bufio.NewWriter(out)
	// Level 1: the guest decompresses under TCG, where speed beats size.
	compressed, _ := gzip.NewWriterLevel(buffered, gzip.BestSpeed)
	archive := &cpioWriter{w: compressed}

	for _, dir := range []string{"bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "run", "root", "var"} {
		archive.dir(dir)
	}
	archive.symlink("var/run", "../run") // named netns live in /var/run/netns
	archive.file("etc/hosts", []byte("127.0.0.1 localhost\n::1 localhost\n"), 0o644)
	// The kernel opens /dev/console for /init before devtmpfs is mounted.
	archive.charDevice("dev/console", 5, 1)
	archive.fileFrom("bin/busybox", busybox, 0o755)
	archive.symlink("bin/sh", "busybox") // needed to run /init itself
	for _, ko := range k.modules {
		archive.fileFrom("lib/modules/"+filepath.Base(ko), ko, 0o644)
	}
	for _, bin := range opts.bins {
		archive.fileFrom("bin/"+filepath.Base(bin), bin, 0o755)
	}
	archive.file("init", []byte(script.String()), 0o755)
	archive.close()

	if archive.err != nil {
		return archive.err
	}
	if err := compressed.Close(); err != nil {
		return err
	}
	if err := buffered.Flush(); err != nil {
		return err
	}
	return out.Close()
}

// guestTimeoutSeconds leaves time to boot and power off (30 s, or half
// of a shorter budget) so the guest's own timeout fires first and the
// console still ends with the exit marker.
func guestTimeoutSeconds(vmTimeout time.Duration) int {
	bootAllowance := min(vmTimeout/2, 30*time.Second)
	return max(1, int((vmTimeout - bootAllowance).Seconds()))
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func shellQuoteAll(args []string) string {
	quoted := make([]string, len(args))
	for i, arg := range args {
		quoted[i] = shellQuote(arg)
	}
	return strings.Join(quoted, " ")
}

// checkEnvAssignment accepts KEY=VALUE where KEY is a shell variable name.
func checkEnvAssignment(kv string) error {
	key, _, ok := strings.Cut(kv, "=")
	valid := ok && key != "" && !isDigit(key[0])
	for _, c := range key {
		valid = valid && (c == '_' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9')
	}
	if !valid {
		return fmt.Errorf("--env %q: want KEY=VALUE with KEY a shell variable name", kv)
	}
	return nil
}
