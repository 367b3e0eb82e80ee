package bench

import (
	"fmt"
	"regexp"
)

// Kind is the shape of a workload's traffic.
type Kind string

const (
	// RequestResponse sends a message and waits for an equal-sized reply,
	// over and over on each connection.
	RequestResponse Kind = "rr"
	// ConnectRequestClose connects, exchanges one request and reply, and
	// closes, over and over.
	ConnectRequestClose Kind = "crr"
	// Stream sends one way as fast as it can.
	Stream Kind = "stream"
)

// SendMethod is how a stream's sender writes.
type SendMethod string

const (
	Write    SendMethod = "write"    // write(2) from a buffer
	Sendfile SendMethod = "sendfile" // sendfile(2) from a memfd
)

// Workload is one traffic pattern, run under every configuration.
type Workload struct {
	Kind Kind `json:"kind"`
	// Size is the message size (rr, crr) or the size of each write (stream).
	Size   int        `json:"size"`
	Method SendMethod `json:"method,omitempty"` // streams only
	Conns  int        `json:"conns"`            // concurrent connections
}

// Name is how reports and --workloads refer to the workload, e.g.
// "rr 64B c=1" or "stream sendfile 64KiB c=1".
func (w Workload) Name() string {
	if w.Kind == Stream {
		return fmt.Sprintf("stream %s %s c=%d", w.Method, sizeName(w.Size), w.Conns)
	}
	return fmt.Sprintf("%s %s c=%d", w.Kind, sizeName(w.Size), w.Conns)
}

// Metric is the unit of the workload's headline number.
func (w Workload) Metric() string {
	switch w.Kind {
	case RequestResponse:
		return "transactions/s"
	case ConnectRequestClose:
		return "connections/s"
	}
	return "Gbit/s"
}

// hasLatency says whether runs report latency percentiles.
func (w Workload) hasLatency() bool { return w.Kind != Stream }

func sizeName(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return fmt.Sprintf("%dB", n)
}

// DefaultWorkloads is what `sockredir bench` runs: the full set, or with
// quick a subset that takes about a minute.
func DefaultWorkloads(quick bool) []Workload {
	if quick {
		return []Workload{
			{Kind: RequestResponse, Size: 64, Conns: 1},
			{Kind: RequestResponse, Size: 64 << 10, Conns: 1},
			{Kind: RequestResponse, Size: 64, Conns: 16},
			{Kind: ConnectRequestClose, Size: 64, Conns: 1},
			{Kind: Stream, Method: Write, Size: 1 << 10, Conns: 1},
			{Kind: Stream, Method: Write, Size: 64 << 10, Conns: 1},
			{Kind: Stream, Method: Write, Size: 1 << 20, Conns: 1},
			{Kind: Stream, Method: Sendfile, Size: 64 << 10, Conns: 1},
		}
	}
	var ws []Workload
	for _, size := range []int{1, 64, 1 << 10, 16 << 10, 64 << 10} {
		ws = append(ws, Workload{Kind: RequestResponse, Size: size, Conns: 1})
	}
	for _, conns := range []int{16, 256} {
		ws = append(ws, Workload{Kind: RequestResponse, Size: 64, Conns: conns})
	}
	for _, conns := range []int{1, 16, 256} {
		ws = append(ws, Workload{Kind: ConnectRequestClose, Size: 64, Conns: conns})
	}
	for _, size := range []int{1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20} {
		ws = append(ws, Workload{Kind: Stream, Method: Write, Size: size, Conns: 1})
	}
	for _, size := range []int{1 << 10, 64 << 10, 1 << 20} {
		ws = append(ws, Workload{Kind: Stream, Method: Sendfile, Size: size, Conns: 1})
	}
	for _, conns := range []int{16, 256} {
		ws = append(ws, Workload{Kind: Stream, Method: Write, Size: 64 << 10, Conns: conns})
	}
	return ws
}

// SelectWorkloads keeps the workloads whose name matches pattern (a regular
// expression); an empty pattern keeps all.
func SelectWorkloads(ws []Workload, pattern string) ([]Workload, error) {
	if pattern == "" {
		return ws, nil
	}
	re, err := regexp.Compile(pattern)
	if err != nil {
		return nil, fmt.Errorf("--workloads %q is not a regular expression: %w", pattern, err)
	}
	var kept []Workload
	for _, w := range ws {
		if re.MatchString(w.Name()) {
			kept = append(kept, w)
		}
	}
	if len(kept) == 0 {
		return nil, fmt.Errorf("--workloads %q matches no workload: `sockredir bench --list` shows their names", pattern)
	}
	return kept, nil
}
