package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/datapath"
)

// bpfStatsSysctl makes the kernel time every BPF program run, which slows
// each run down: it is off while the benchmark measures.
const bpfStatsSysctl = "/proc/sys/kernel/bpf_stats_enabled"

// disableBPFStats turns kernel.bpf_stats_enabled off and returns what puts
// the previous value back.
func disableBPFStats() (restore func() error, err error) {
	old, err := os.ReadFile(bpfStatsSysctl)
	if err != nil {
		return nil, fmt.Errorf("reading kernel.bpf_stats_enabled: %w", err)
	}
	previous := strings.TrimSpace(string(old))
	if previous == "0" {
		return func() error { return nil }, nil
	}
	if err := os.WriteFile(bpfStatsSysctl, []byte("0"), 0); err != nil {
		return nil, fmt.Errorf("turning kernel.bpf_stats_enabled off while measuring: %w", err)
	}
	return func() error { return os.WriteFile(bpfStatsSysctl, []byte(previous), 0) }, nil
}

// Names of the programs in ProgramCost.
const (
	programSockOps = "sock_ops"
	programSkMsg   = "sk_msg"
)

// ProgramCost is one program's run time in one workload.
type ProgramCost struct {
	Config    Config  `json:"config"`
	Workload  string  `json:"workload"`
	Program   string  `json:"program"`
	Calls     uint64  `json:"calls"`
	NsPerCall float64 `json:"ns_per_call"`
	// CallsPerOp is runs per operation: per transaction (rr), connection
	// (crr) or write (stream).
	CallsPerOp float64 `json:"calls_per_op"`
	// BytesPerCall is how much each sk_msg run was given: it shows whether
	// the program runs once per write or once per chunk of one.
	BytesPerCall float64 `json:"bytes_per_call,omitempty"`
}

// operations counts a client's transactions, connections or writes.
func operations(w Workload, client *workerReport) int64 {
	if w.Kind == ConnectRequestClose {
		return client.Connections
	}
	return client.BytesSent / int64(w.Size)
}

// programCostRuns are the workloads of the program cost phase: small
// messages (sk_msg per call), large writes (sk_msg per chunk) and new
// connections (sock_ops).
var programCostRuns = []Workload{
	{Kind: RequestResponse, Size: 64, Conns: 1},
	{Kind: Stream, Method: Write, Size: 64 << 10, Conns: 1},
	{Kind: ConnectRequestClose, Size: 64, Conns: 1},
}

// programCostDuration is how long each run of the program cost phase is.
const programCostDuration = 300 * time.Millisecond

// measureProgramCosts runs programCostRuns under sockredir and its hooks
// alone with run-time statistics on, and reports each program's cost.
func (r *runner) measureProgramCosts(ctx context.Context, bar *progress) ([]ProgramCost, error) {
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return nil, fmt.Errorf("enabling BPF run-time statistics: %w", err)
	}
	defer stats.Close()
	var costs []ProgramCost
	for _, cfg := range []Config{Sockredir, HookOnly} {
		progs, err := r.programs(cfg)
		if err != nil {
			return nil, err
		}
		defer closePrograms(progs)
		for _, w := range programCostRuns {
			bar.step(fmt.Sprintf("program run time: %s, %s", w.Name(), cfg))
			before, err := programStats(progs)
			if err != nil {
				return nil, err
			}
			client, server, err := r.run(ctx, cfg, w, r.opts.Warmup, programCostDuration)
			if err != nil {
				return nil, fmt.Errorf("%s, %s: %w", w.Name(), cfg, err)
			}
			after, err := programStats(progs)
			if err != nil {
				return nil, err
			}
			for name := range progs {
				calls := after[name].RunCount - before[name].RunCount
				c := ProgramCost{Config: cfg, Workload: w.Name(), Program: name, Calls: calls}
				if ops := operations(w, client); ops > 0 {
					c.CallsPerOp = float64(calls) / float64(ops)
				}
				if calls > 0 {
					c.NsPerCall = float64(after[name].Runtime-before[name].Runtime) / float64(calls)
					if name == programSkMsg {
						c.BytesPerCall = float64(client.BytesSent+server.BytesSent) / float64(calls)
					}
				}
				costs = append(costs, c)
			}
		}
	}
	return costs, nil
}

// programs opens the configuration's sock_ops and sk_msg programs.
func (r *runner) programs(cfg Config) (map[string]*ebpf.Program, error) {
	st, err := datapath.ReadStatus(r.env.pinDirs[cfg])
	if err != nil {
		return nil, err
	}
	progs := map[string]*ebpf.Program{}
	for _, p := range st.Programs {
		prog, err := ebpf.NewProgramFromID(ebpf.ProgramID(p.ID))
		if err != nil {
			closePrograms(progs)
			return nil, fmt.Errorf("opening program %s: %w", p.Name, err)
		}
		switch prog.Type() {
		case ebpf.SockOps:
			progs[programSockOps] = prog
		case ebpf.SkMsg:
			progs[programSkMsg] = prog
		default:
			prog.Close()
		}
	}
	if len(progs) != 2 {
		closePrograms(progs)
		return nil, errors.New("the datapath's sock_ops and sk_msg programs are not both pinned")
	}
	return progs, nil
}

func programStats(progs map[string]*ebpf.Program) (map[string]ebpf.ProgramStats, error) {
	out := map[string]ebpf.ProgramStats{}
	for name, p := range progs {
		s, err := p.Stats()
		if err != nil {
			return nil, fmt.Errorf("reading the run time of %s: %w", name, err)
		}
		out[name] = *s
	}
	return out, nil
}

func closePrograms(progs map[string]*ebpf.Program) {
	for _, p := range progs {
		p.Close()
	}
}
