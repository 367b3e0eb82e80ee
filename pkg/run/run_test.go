package run

import (
	"testing"

	"golang.org/x/sys/unix"
)

func TestNoCommand(t *testing.T) {
	if code, err := Run(Options{}); code != ExitFailed || err == nil {
		t.Errorf("exit %d, %v: want %d and an error", code, err, ExitFailed)
	}
}

// Signals that no terminal sends are always passed on.
func TestSignalsNotFromTerminals(t *testing.T) {
	for _, sig := range []unix.Signal{unix.SIGTERM, unix.SIGUSR1, unix.SIGUSR2} {
		if reachedCommandAlready(sig) {
			t.Errorf("%v would not be passed on", sig)
		}
	}
}
