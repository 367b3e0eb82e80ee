// Package bench measures what sockredir buys on this host. It runs
// workloads (request/response, connect-request-close, one-way streams) under
// plain TCP over loopback, sockredir, sockredir's hooks alone and AF_UNIX,
// interleaved round by round, inside a cgroup and network namespace of its
// own, and reports medians, spread, ratios and the targets met.
//
// The clients and servers are worker processes: Options.WorkerCommand
// started again, which must call RunWorker.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"go.uber.org/zap"

	"github.com/sockredir/sockredir/pkg/sandbox"
)

// Options says what to run.
type Options struct {
	// Quick runs fewer workloads for shorter, about a minute in all.
	Quick bool
	// Rounds is how often every configuration runs each workload; 0 means 5.
	Rounds int
	// Duration is the measured time of one run, Warmup the unmeasured time
	// before it; 0 means the defaults for Quick or not.
	Duration time.Duration
	Warmup   time.Duration
	// Workloads to run; nil means DefaultWorkloads(Quick).
	Workloads []Workload
	// Configs to compare; nil means AllConfigs. TCP is always included:
	// it is the baseline.
	Configs []Config
	// WorkerCommand starts a worker: a program that calls RunWorker.
	// Required; the sockredir CLI passes itself with "bench worker".
	WorkerCommand []string
	// Progress receives a progress bar (on a terminal) or a line per
	// workload; nil means none.
	Progress io.Writer
	// Command and Version are recorded in the report.
	Command string
	Version string
	// Log receives what the datapath does; nil means no logging.
	Log *zap.Logger
}

// Defaults, chosen so that a full run takes about four minutes and a quick
// one about a minute on a 2-CPU machine.
const (
	defaultRounds        = 5
	defaultDuration      = 400 * time.Millisecond
	defaultWarmup        = 100 * time.Millisecond
	defaultQuickDuration = 200 * time.Millisecond
	defaultQuickWarmup   = 50 * time.Millisecond
	// cellGrace bounds how long a run may take beyond its warm-up and
	// duration (start-up, draining the queues, shutting down).
	cellGrace = 20 * time.Second
)

func (o Options) withDefaults() (Options, error) {
	if len(o.WorkerCommand) == 0 {
		return o, errors.New("bench.Options.WorkerCommand is empty: it must start a program that calls bench.RunWorker")
	}
	if o.Rounds == 0 {
		o.Rounds = defaultRounds
	}
	if o.Rounds < 1 {
		return o, fmt.Errorf("rounds must be at least 1, not %d", o.Rounds)
	}
	if o.Duration == 0 {
		o.Duration = map[bool]time.Duration{false: defaultDuration, true: defaultQuickDuration}[o.Quick]
	}
	if o.Warmup == 0 {
		o.Warmup = map[bool]time.Duration{false: defaultWarmup, true: defaultQuickWarmup}[o.Quick]
	}
	if o.Workloads == nil {
		o.Workloads = DefaultWorkloads(o.Quick)
	}
	if o.Configs == nil {
		o.Configs = AllConfigs
	}
	configs := []Config{TCP}
	for _, c := range o.Configs {
		switch c {
		case TCP:
		case Sockredir, HookOnly, Unix:
			configs = append(configs, c)
		default:
			return o, fmt.Errorf("unknown configuration %q: use tcp, sockredir, hook-only or unix", c)
		}
	}
	o.Configs = configs
	if o.Log == nil {
		o.Log = zap.NewNop()
	}
	return o, nil
}

// ErrRunsFailed says that some runs failed (lost bytes, an error in a
// worker): the report lists them, and their numbers are left out.
var ErrRunsFailed = errors.New("some benchmark runs failed: see the errors in the report")

// Run runs the benchmark. It needs root. Everything it creates (cgroups,
// namespace, pins) is removed before it returns, also on error or when ctx
// is cancelled. It returns the report, and ErrRunsFailed with it when some
// runs failed.
func Run(ctx context.Context, opts Options) (_ *Report, err error) {
	opts, err = opts.withDefaults()
	if err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("sockredir bench needs root (it attaches BPF programs to cgroups of its own): run it with sudo")
	}
	restoreStats, err := disableBPFStats()
	if err != nil {
		return nil, err
	}
	defer func() {
		if rerr := restoreStats(); rerr != nil {
			err = errors.Join(err, fmt.Errorf("restoring kernel.bpf_stats_enabled (set it back by hand): %w", rerr))
		}
	}()
	e, err := newEnv(opts.Log)
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := e.close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("cleaning up: %w", cerr))
		}
	}()
	r := &runner{env: e, opts: opts}
	return r.runAll(ctx)
}

// runner runs workloads in the benchmark's sandbox.
type runner struct {
	env  *env
	opts Options
}

func (r *runner) runAll(ctx context.Context) (*Report, error) {
	opts := r.opts
	rep := newReport(opts)
	bar := newProgress(opts.Progress, len(opts.Workloads)*opts.Rounds*len(opts.Configs)+len(programCostRuns)*2)
	defer bar.finish()
	for _, w := range opts.Workloads {
		wr, err := r.runWorkload(ctx, w, bar)
		if err != nil {
			return nil, err
		}
		rep.Results = append(rep.Results, wr)
		bar.note(fmt.Sprintf("%-28s %s", w.Name(), wr.oneLine()))
	}
	var err error
	rep.ProgramCosts, err = r.measureProgramCosts(ctx, bar)
	if ctx.Err() != nil {
		return nil, fmt.Errorf("interrupted: %w", context.Cause(ctx))
	}
	if err != nil {
		rep.Errors = append(rep.Errors, fmt.Sprintf("measuring the programs' run time: %v", err))
	}
	rep.finish()
	if len(rep.Errors) > 0 {
		return rep, ErrRunsFailed
	}
	return rep, nil
}

// runWorkload runs w under every configuration, round by round. A failed
// run is recorded in its round; only an interruption or a datapath that
// can't be read stops the benchmark.
func (r *runner) runWorkload(ctx context.Context, w Workload, bar *progress) (WorkloadResult, error) {
	opts := r.opts
	wr := WorkloadResult{Workload: w, Name: w.Name(), Metric: w.Metric()}
	rounds := make(map[Config][]RoundResult)
	// The datapaths' counters are read around a workload's rounds, not
	// around each run: reading them takes about 100 ms.
	countersBefore, err := r.env.counters()
	if err != nil {
		return wr, err
	}
	for round := range opts.Rounds {
		// Each round starts with the next configuration, so that none
		// always runs first after a change of workload.
		for k := range opts.Configs {
			cfg := opts.Configs[(round+k)%len(opts.Configs)]
			bar.step(fmt.Sprintf("%s, %s, round %d/%d", w.Name(), cfg, round+1, opts.Rounds))
			res, err := r.measure(ctx, cfg, w)
			if ctx.Err() != nil {
				return wr, fmt.Errorf("interrupted: %w", context.Cause(ctx))
			}
			if err != nil {
				res.Error = err.Error()
			}
			rounds[cfg] = append(rounds[cfg], res)
		}
	}
	countersAfter, err := r.env.counters()
	if err != nil {
		return wr, err
	}
	for _, cfg := range opts.Configs {
		checkPath(cfg, rounds[cfg], countersBefore[cfg], countersAfter[cfg])
		wr.Configs = append(wr.Configs, ConfigResult{Config: cfg, Rounds: rounds[cfg]})
	}
	wr.summarize()
	return wr, nil
}

// measure runs w once under cfg, checks its bytes, and returns its numbers.
func (r *runner) measure(ctx context.Context, cfg Config, w Workload) (RoundResult, error) {
	client, server, err := r.run(ctx, cfg, w, r.opts.Warmup, r.opts.Duration)
	if err != nil {
		return RoundResult{}, err
	}
	res := RoundResult{Bytes: client.BytesSent + server.BytesSent}
	seconds := r.opts.Duration.Seconds()
	switch w.Kind {
	case RequestResponse, ConnectRequestClose:
		res.Value = float64(client.Ops) / seconds
		res.P50us = float64(client.P50) / float64(time.Microsecond)
		res.P99us = float64(client.P99) / float64(time.Microsecond)
	case Stream:
		res.Value = float64(server.WindowBytes) * 8 / float64(server.WindowNanos)
	}
	return res, nil
}

// run runs w once under cfg: a server worker, then a client worker; it
// checks that every byte arrived.
func (r *runner) run(ctx context.Context, cfg Config, w Workload, warmup, duration time.Duration) (client, server *workerReport, err error) {
	ctx, cancel := context.WithTimeout(ctx, warmup+duration+cellGrace)
	defer cancel()
	base := job{Workload: w, Network: cfg.network(), Warmup: warmup, Duration: duration, Timeout: warmup + duration + cellGrace}

	serverJob := base
	serverJob.Role = serverRole
	serverJob.Address = "127.0.0.1:0"
	if cfg == Unix {
		serverJob.Address = "@sockredir-bench-" + sandbox.RandomSuffix()
	}
	srv, err := r.env.startWorker(ctx, r.opts.WorkerCommand, cfg, serverJob)
	if err != nil {
		return nil, nil, err
	}
	// On an early return the server is killed, and waited for: nothing of
	// this run may still be running in the cgroup when the next starts.
	defer func() {
		cancel()
		srv.wait()
	}()
	addr, err := srv.address(ctx)
	if err != nil {
		return nil, nil, err
	}
	clientJob := base
	clientJob.Role = clientRole
	clientJob.Address = addr
	cli, err := r.env.startWorker(ctx, r.opts.WorkerCommand, cfg, clientJob)
	if err != nil {
		return nil, nil, err
	}
	client, clientErr := cli.wait()
	srv.stop()
	server, serverErr := srv.wait()
	if err := errors.Join(clientErr, serverErr); err != nil {
		return nil, nil, err
	}
	if err := verifyBytes(w, client, server); err != nil {
		return nil, nil, err
	}
	return client, server, nil
}
