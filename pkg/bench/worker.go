package bench

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"time"
)

// jobEnv carries a worker's job, as JSON, to the re-executed binary.
const jobEnv = "SOCKREDIR_BENCH_JOB"

// role is which end of the workload a worker plays.
type role string

const (
	serverRole role = "server"
	clientRole role = "client"
)

// job is what one worker process does.
type job struct {
	Role     role     `json:"role"`
	Workload Workload `json:"workload"`
	Network  string   `json:"network"` // "tcp" or "unix"
	// Address is where the server listens, or what the client dials.
	Address string `json:"address"`
	// The client measures for Duration after a Warmup that starts once it
	// has connected; a stream's server measures from its first read at
	// least Warmup after the first byte. No clock is shared: a worker that
	// starts late on a busy machine still measures a whole window.
	Warmup   time.Duration `json:"warmup"`
	Duration time.Duration `json:"duration"`
	// Timeout is when a worker gives up.
	Timeout time.Duration `json:"timeout"`
}

// window is when a client that starts sending at start measures.
func (j job) window(start int64) (measureFrom, stopAt int64) {
	measureFrom = start + int64(j.Warmup)
	return measureFrom, measureFrom + int64(j.Duration)
}

// workerMessage is one line a worker prints: first Listening (servers),
// then exactly one Report.
type workerMessage struct {
	Listening string        `json:"listening,omitempty"`
	Report    *workerReport `json:"report,omitempty"`
}

// workerReport is what a worker counted.
type workerReport struct {
	Connections   int64 `json:"connections"` // connections that completed
	BytesSent     int64 `json:"bytes_sent"`
	BytesReceived int64 `json:"bytes_received"`
	// Ops are the transactions (rr) or connections (crr) that a client
	// began and finished inside the measured window; P50 and P99 are
	// their latencies.
	Ops int64         `json:"ops,omitempty"`
	P50 time.Duration `json:"p50,omitempty"`
	P99 time.Duration `json:"p99,omitempty"`
	// WindowBytes and WindowNanos are what a stream's receiver read from
	// its first read after the warm-up to the last end of stream.
	WindowBytes int64 `json:"window_bytes,omitempty"`
	WindowNanos int64 `json:"window_nanos,omitempty"`
}

// RunWorker does the job that Run passed to this process and prints its
// report on stdout. Run starts workers with Options.WorkerCommand: a
// program that embeds the benchmark calls RunWorker from that command (the
// sockredir CLI does it in `sockredir bench worker`).
func RunWorker() error {
	spec := os.Getenv(jobEnv)
	if spec == "" {
		return fmt.Errorf("no %s in the environment: this command is started by `sockredir bench`, not by hand", jobEnv)
	}
	var j job
	if err := json.Unmarshal([]byte(spec), &j); err != nil {
		return fmt.Errorf("reading the job: %w", err)
	}
	// One thread does all the work, like an event-loop server.
	runtime.LockOSThread()
	out := json.NewEncoder(os.Stdout)
	var rep *workerReport
	var err error
	switch j.Role {
	case serverRole:
		rep, err = runServer(j, func(addr string) error { return out.Encode(workerMessage{Listening: addr}) })
	case clientRole:
		rep, err = runClient(j)
	default:
		err = fmt.Errorf("unknown role %q", j.Role)
	}
	if err != nil {
		return fmt.Errorf("%s of %s: %w", j.Role, j.Workload.Name(), err)
	}
	return out.Encode(workerMessage{Report: rep})
}

func runClient(j job) (*workerReport, error) {
	switch j.Workload.Kind {
	case RequestResponse:
		return runRRClient(j)
	case ConnectRequestClose:
		return runCRRClient(j)
	case Stream:
		return runStreamClient(j)
	}
	return nil, fmt.Errorf("unknown workload kind %q", j.Workload.Kind)
}

// readMessages reads a worker's output: the listening address, if any, goes
// to listening as soon as it is printed; the report is returned.
func readMessages(r io.Reader, listening chan<- string) (*workerReport, error) {
	dec := json.NewDecoder(r)
	for {
		var m workerMessage
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return nil, errors.New("the worker exited without a report")
			}
			return nil, fmt.Errorf("reading the worker's output: %w", err)
		}
		if m.Listening != "" && listening != nil {
			listening <- m.Listening
		}
		if m.Report != nil {
			return m.Report, nil
		}
	}
}
