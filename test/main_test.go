// Package test holds sockredir's privileged end-to-end tests. They need root;
// with CI=true they fail instead of skipping when they can't load BPF.
package test

import (
	"os"
	"strconv"
	"testing"

	"github.com/sockredir/sockredir/test/harness"
)

func TestMain(m *testing.M) {
	maybeExecWithBoundingSet()
	harness.MaybeRunAgent()
	os.Exit(m.Run())
}

// transferBytes is how much each direction of a connection carries:
// SOCKREDIR_TEST_BYTES, or 128 MiB (the kernel matrix sets less: its
// kernels run under emulation).
func transferBytes(t *testing.T) int64 {
	return envBytes(t, "SOCKREDIR_TEST_BYTES", 128<<20)
}

// envBytes is the byte count in environment variable name, or def.
func envBytes(t *testing.T, name string, def int64) int64 {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q is not a positive number", name, s)
	}
	return n
}
