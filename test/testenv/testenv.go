// Package testenv decides what a test does when this machine can't run it:
// skip, or, in CI (CI=true), fail, because there every test must run.
package testenv

import (
	"fmt"
	"os"
	"testing"
)

// InCI reports whether the tests run in CI (CI=true).
func InCI() bool { return os.Getenv("CI") == "true" }

// Skipf skips the test, or fails it in CI.
func Skipf(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if InCI() {
		t.Fatalf("%s (CI=true: every test must run)", msg)
	}
	t.Skipf("%s (set CI=true to make this a failure)", msg)
}

// RequireRoot skips the test, or fails it in CI, unless it runs as root.
func RequireRoot(t testing.TB, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skipf(t, "needs root %s", why)
	}
}
