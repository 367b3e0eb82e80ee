package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/sockredir/sockredir/pkg/datapath"
)

func TestConfigFile(t *testing.T) {
	file := filepath.Join(t.TempDir(), "sockredir.yaml")
	if err := os.WriteFile(file, []byte("map_size: 8\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	base := datapath.Config{Cgroup: "/sys/fs/cgroup/x", MapSize: 1024}

	t.Run("none", func(t *testing.T) {
		d := &daemon{opts: Options{Base: base}, log: zap.NewNop()}
		if cfg, err := d.config(); err != nil || cfg.MapSize != 1024 {
			t.Errorf("%+v, %v: want Base", cfg, err)
		}
	})
	t.Run("unreadable", func(t *testing.T) {
		d := &daemon{opts: Options{Base: base, ConfigFile: file + ".missing"}, log: zap.NewNop()}
		if _, err := d.config(); err == nil || !strings.Contains(err.Error(), "reading config") {
			t.Errorf("error %v, want one about reading the file", err)
		}
	})
	t.Run("invalid", func(t *testing.T) {
		d := &daemon{opts: Options{Base: base, ConfigFile: file}, log: zap.NewNop()}
		if _, err := d.config(); err == nil || !strings.Contains(err.Error(), file) || !strings.Contains(err.Error(), "map_size") {
			t.Errorf("error %v: want the unknown key map_size refused, naming the file", err)
		}
	})
	t.Run("applied over the command line", func(t *testing.T) {
		policyFile := filepath.Join(t.TempDir(), "policy.yaml")
		if err := os.WriteFile(policyFile, []byte("redirect:\n  exclude_ports: [22]\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		d := &daemon{opts: Options{Base: base, ConfigFile: policyFile}, log: zap.NewNop()}
		cfg, err := d.config()
		if err != nil || cfg.MapSize != 1024 || cfg.Cgroup != base.Cgroup || len(cfg.Policy.Redirect.ExcludePorts) != 1 {
			t.Errorf("%+v, %v: want Base with the file's policy", cfg, err)
		}
	})
}
