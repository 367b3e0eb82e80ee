package hostfs

import (
	"strings"
	"testing"

	"github.com/sockredir/sockredir/test/testenv"
)

func TestParseMountinfo(t *testing.T) {
	const mountinfo = `22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
41 30 0:38 / /sys/fs/bpf rw,relatime shared:9 - bpf bpf rw,mode=700
42 22 0:39 / /mnt/with\040space rw - tmpfs tmpfs rw
`
	mounts, err := parseMountinfo(strings.NewReader(mountinfo))
	if err != nil {
		t.Fatal(err)
	}
	want := []mount{
		{"/", "ext4"},
		{"/sys/fs/cgroup/unified", "cgroup2"},
		{"/sys/fs/bpf", "bpf"},
		{"/mnt/with space", "tmpfs"},
	}
	if len(mounts) != len(want) {
		t.Fatalf("got %d mounts, want %d: %v", len(mounts), len(want), mounts)
	}
	for i := range want {
		if mounts[i] != want[i] {
			t.Errorf("mount %d: got %+v, want %+v", i, mounts[i], want[i])
		}
	}
}

func TestParseMountinfoRejectsGarbage(t *testing.T) {
	if _, err := parseMountinfo(strings.NewReader("not a mountinfo line\n")); err == nil {
		t.Fatal("want an error for a malformed line")
	}
}

func TestWithin(t *testing.T) {
	for _, c := range []struct {
		path, dir string
		want      bool
	}{
		{"/sys/fs/bpf/sockredir", "/sys/fs/bpf", true},
		{"/sys/fs/bpf", "/sys/fs/bpf", true},
		{"/sys/fs/bpfx/a", "/sys/fs/bpf", false},
		{"/tmp/pins", "/sys/fs/bpf", false},
	} {
		if got := within(c.path, c.dir); got != c.want {
			t.Errorf("within(%q, %q) = %v, want %v", c.path, c.dir, got, c.want)
		}
	}
}

func TestCgroupV2MountOnThisHost(t *testing.T) {
	mp, err := CgroupV2Mount()
	if err != nil {
		testenv.Skipf(t, "no cgroup v2 here: %v", err)
	}
	if err := CheckCgroup(mp); err != nil {
		t.Fatalf("the cgroup2 mount point %s fails its own check: %v", mp, err)
	}
	if err := CheckCgroup("/proc"); err == nil {
		t.Fatal("/proc accepted as a cgroup")
	}
}
