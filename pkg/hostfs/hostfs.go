// Package hostfs finds the host filesystems sockredir works with: the cgroup
// v2 hierarchy (whose mount point differs between hosts), the BPF
// filesystem that holds pinned objects and the tracing filesystem that
// tracepoints are attached through (either may not be mounted yet).
package hostfs

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultBPFFS is where the BPF filesystem is mounted by convention.
const DefaultBPFFS = "/sys/fs/bpf"

// DefaultTracefs is where the tracing filesystem is mounted by convention.
const DefaultTracefs = "/sys/kernel/tracing"

// CgroupV2Mount returns the mount point of the cgroup v2 hierarchy:
// /sys/fs/cgroup on most hosts, /sys/fs/cgroup/unified on hybrid ones.
func CgroupV2Mount() (string, error) {
	point, err := mountOf("cgroup2")
	if err != nil || point != "" {
		return point, err
	}
	return "", errors.New("no cgroup v2 hierarchy is mounted: sockredir attaches to a cgroup v2; " +
		"mount one with `mount -t cgroup2 none /sys/fs/cgroup` or boot with systemd.unified_cgroup_hierarchy=1")
}

// ResolveCgroup returns the absolute, clean form of a cgroup path, or the
// root of the cgroup v2 hierarchy for "". The datapath records its cgroup
// and compares it later: "." or a trailing slash must not name another
// cgroup, or the same one differently.
func ResolveCgroup(path string) (string, error) {
	if path == "" {
		return CgroupV2Mount()
	}
	return filepath.Abs(path)
}

// EnsureTracefs mounts the tracing filesystem at its conventional place
// unless one is mounted already (debugfs's tracing directory counts).
func EnsureTracefs() error {
	for _, fstype := range []string{"tracefs", "debugfs"} {
		if point, err := mountOf(fstype); err != nil || point != "" {
			return err
		}
	}
	if err := unix.Mount("tracefs", DefaultTracefs, "tracefs", 0, ""); err != nil {
		return fmt.Errorf("mounting the tracing filesystem at %s: %w", DefaultTracefs, err)
	}
	return nil
}

// mountOf returns where a filesystem of type fstype is mounted, "" if nowhere.
func mountOf(fstype string) (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	mounts, err := parseMountinfo(f)
	if err != nil {
		return "", err
	}
	for _, m := range mounts {
		if m.fstype == fstype {
			return m.point, nil
		}
	}
	return "", nil
}

// CheckCgroup reports whether path is a directory of the cgroup v2 hierarchy.
func CheckCgroup(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("cgroup %s does not exist: pass the path of an existing cgroup v2 directory with --cgroup", path)
		}
		return fmt.Errorf("cgroup %s: %w", path, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("%s is not a cgroup v2 directory: pass one with --cgroup (cgroup v1 is not supported)", path)
	}
	return nil
}

// EnsureBPFFS makes sure pinDir can hold pins: it must lie on a BPF
// filesystem. When none is mounted at the conventional place and pinDir is
// below it, one is mounted there.
func EnsureBPFFS(pinDir string) error {
	onBPFFS, err := isBPFFS(nearestExisting(pinDir))
	if err != nil || onBPFFS {
		return err
	}
	if !within(pinDir, DefaultBPFFS) {
		return fmt.Errorf("pin directory %s is not on a BPF filesystem: choose one under %s or mount one with `mount -t bpf bpf DIR`",
			pinDir, DefaultBPFFS)
	}
	if err := os.MkdirAll(DefaultBPFFS, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("bpf", DefaultBPFFS, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mounting the BPF filesystem at %s: %w", DefaultBPFFS, err)
	}
	return nil
}

func isBPFFS(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, fmt.Errorf("checking the filesystem of %s: %w", path, err)
	}
	return st.Type == unix.BPF_FS_MAGIC, nil
}

// nearestExisting returns path or its closest ancestor that exists.
func nearestExisting(path string) string {
	for p := filepath.Clean(path); ; p = filepath.Dir(p) {
		if _, err := os.Stat(p); err == nil || p == "/" {
			return p
		}
	}
}

func within(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

type mount struct {
	point  string
	fstype string
}

// parseMountinfo reads the format of proc(5)'s /proc/PID/mountinfo.
func parseMountinfo(r io.Reader) ([]mount, error) {
	var mounts []mount
	s := bufio.NewScanner(r)
	for s.Scan() {
		// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw
		before, after, ok := strings.Cut(s.Text(), " - ")
		fields, tail := strings.Fields(before), strings.Fields(after)
		if !ok || len(fields) < 5 || len(tail) < 1 {
			return nil, fmt.Errorf("malformed mountinfo line %q", s.Text())
		}
		mounts = append(mounts, mount{point: unescapeOctal(fields[4]), fstype: tail[0]})
	}
	return mounts, s.Err()
}

// unescapeOctal undoes the \040-style escaping of spaces and such in mount points.
func unescapeOctal(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) && isOctal(s[i+1:i+4]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(s string) bool {
	for _, c := range []byte(s) {
		if c < '0' || c > '7' {
			return false
		}
	}
	return true
}
