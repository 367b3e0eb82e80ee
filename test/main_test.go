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
	harness.MaybeRunAgent()
	os.Exit(m.Run())
}

// transferBytes is how much each direction of a connection carries:
// SOCKREDIR_TEST_BYTES, or 128 MiB (the kernel matrix sets less: its
// kernels run under emulation).
func transferBytes(t *testing.T) int64 {
	if s := os.Getenv("SOCKREDIR_TEST_BYTES"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n <= 0 {
			t.Fatalf("SOCKREDIR_TEST_BYTES=%q is not a positive number", s)
		}
		return n
	}
	return 128 << 20
}
