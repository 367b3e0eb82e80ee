package bench

import (
	"errors"
	"fmt"

	"github.com/sockredir/sockredir/pkg/datapath"
)

// ErrLostBytes marks a run whose receivers did not get exactly what their
// peers sent. Several sockmap bugs look like a fast sender and a receiver
// that silently misses data: such a run is an error, never a result.
var ErrLostBytes = errors.New("bytes received differ from bytes sent")

// verifyBytes checks that each side received exactly what the other sent,
// and that every connection ended as the workload says. Bytes can only go
// missing (or be duplicated), never appear, so equal totals mean every
// connection got its bytes.
func verifyBytes(w Workload, client, server *workerReport) error {
	if client.BytesSent != server.BytesReceived {
		return fmt.Errorf("%w: the client sent %d bytes, the server received %d", ErrLostBytes, client.BytesSent, server.BytesReceived)
	}
	if server.BytesSent != client.BytesReceived {
		return fmt.Errorf("%w: the server sent %d bytes, the client received %d", ErrLostBytes, server.BytesSent, client.BytesReceived)
	}
	if client.Connections != server.Connections {
		return fmt.Errorf("the client completed %d connections, the server %d", client.Connections, server.Connections)
	}
	if client.BytesSent == 0 {
		return errors.New("no bytes were sent")
	}
	switch w.Kind {
	case RequestResponse, ConnectRequestClose:
		// Every request was answered in full: both directions carry
		// whole messages of the same size.
		if client.BytesSent%int64(w.Size) != 0 || client.BytesReceived != client.BytesSent {
			return fmt.Errorf("%w: %d bytes of requests and %d of replies are not whole %d-byte exchanges",
				ErrLostBytes, client.BytesSent, client.BytesReceived, w.Size)
		}
		if client.Ops == 0 {
			return errors.New("no operation finished inside the measured window: make --duration longer")
		}
	case Stream:
		if server.WindowNanos <= 0 || server.WindowBytes <= 0 {
			return errors.New("the receiver read nothing after the warm-up: make --duration longer")
		}
	}
	return nil
}

// checkPath marks every round of cfg failed if, together, they did not
// take cfg's path. Rounds that failed already carried an unknown number of
// bytes: then there is nothing to check.
func checkPath(cfg Config, rounds []RoundResult, before, after datapath.Counters) {
	var bytes int64
	for _, r := range rounds {
		if r.Error != "" {
			return
		}
		bytes += r.Bytes
	}
	if err := verifyPath(cfg, before, after, bytes); err != nil {
		for i := range rounds {
			rounds[i].Error = err.Error()
		}
	}
}

// verifyPath checks that a configuration's bytes took the path it is named
// for: all of them redirected under sockredir, none under its hooks alone.
// Otherwise the comparison would be TCP against TCP. before and after are
// the counters of the configuration's datapath around the run.
//
// Passed bytes are only bounded, not matched: when the kernel cannot push a
// passed message in full (a non-blocking socket's send buffer is full), it
// keeps the verdict and applies it to the next message without running the
// program (tcp_bpf_send_verdict leaves psock->eval set on error), so that
// message is not counted.
func verifyPath(cfg Config, before, after datapath.Counters, bytes int64) error {
	redirected := int64(after.BytesRedirected - before.BytesRedirected)
	passed := int64(after.BytesPassed - before.BytesPassed)
	switch cfg {
	case Sockredir:
		if redirected != bytes || passed != 0 {
			return fmt.Errorf("sockredir redirected %d of %d bytes and passed %d to TCP: the connections were not accelerated",
				redirected, bytes, passed)
		}
	case HookOnly:
		if redirected != 0 || passed <= 0 || passed > bytes {
			return fmt.Errorf("with its hooks alone sockredir should pass every byte to TCP, but it passed %d of %d and redirected %d",
				passed, bytes, redirected)
		}
	}
	return nil
}
