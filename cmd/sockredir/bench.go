package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sockredir/sockredir/pkg/bench"
)

// minRounds is the fewest rounds whose median and spread mean something.
const minRounds = 5

func newBenchCommand(log func() *zap.Logger) *cobra.Command {
	var (
		opts      bench.Options
		asJSON    bool
		chartPath string
		pattern   string
		configs   []string
		list      bool
	)
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure what sockredir buys on this host: TCP, sockredir, its hooks alone and AF_UNIX side by side",
		Long: `bench runs request/response, connect-request-close and one-way stream workloads
under plain TCP over loopback, sockredir, sockredir attached but passing every
message to TCP, and AF_UNIX sockets, interleaved round by round, in a cgroup and
network namespace of its own. It prints medians, spread and ratios to TCP,
checks the targets, and draws a chart. Every run checks that every byte sent
was received. Needs root; removes everything it creates, also on Ctrl-C.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			workloads, err := bench.SelectWorkloads(bench.DefaultWorkloads(opts.Quick), pattern)
			if err != nil {
				return err
			}
			if list {
				for _, w := range workloads {
					fmt.Println(w.Name())
				}
				return nil
			}
			if opts.Rounds < minRounds {
				return fmt.Errorf("--rounds must be at least %d: fewer rounds give no median and spread worth reporting", minRounds)
			}
			for _, c := range configs {
				opts.Configs = append(opts.Configs, bench.Config(c))
			}
			exe, err := os.Executable()
			if err != nil {
				return fmt.Errorf("finding this executable to start the workers: %w", err)
			}
			opts.Workloads = workloads
			opts.WorkerCommand = []string{exe, "bench", "worker"}
			opts.Progress = os.Stderr
			opts.Command = strings.Join(os.Args, " ")
			opts.Version = version
			// The datapath's progress (attached, down) is noise here.
			opts.Log = log().WithOptions(zap.IncreaseLevel(zapcore.ErrorLevel))

			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			rep, err := bench.Run(ctx, opts)
			if rep == nil {
				return err
			}
			if werr := writeBenchReport(rep, asJSON, chartPath); werr != nil {
				return errors.Join(err, werr)
			}
			return err
		},
	}
	cmd.Flags().BoolVar(&opts.Quick, "quick", false, "run fewer workloads for shorter: about a minute")
	cmd.Flags().IntVar(&opts.Rounds, "rounds", minRounds, "rounds: every configuration runs every workload once per round")
	cmd.Flags().DurationVar(&opts.Duration, "duration", 0, "measured time of each run (default 400ms, 200ms with --quick)")
	cmd.Flags().DurationVar(&opts.Warmup, "warmup", 0, "unmeasured time before each run (default 100ms, 50ms with --quick)")
	cmd.Flags().StringVar(&pattern, "workloads", "", "run only the workloads whose name matches this regular expression (see --list)")
	cmd.Flags().StringSliceVar(&configs, "configs", nil, "configurations to compare with tcp: sockredir, hook-only, unix (default all)")
	cmd.Flags().BoolVar(&list, "list", false, "list the workloads' names and exit")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	cmd.Flags().StringVar(&chartPath, "chart", "sockredir-bench.svg", "write the chart (SVG) here; empty for none")
	cmd.AddCommand(newBenchWorkerCommand())
	return cmd
}

// newBenchWorkerCommand is how the benchmark starts its clients and servers:
// this binary again, inside the benchmark's cgroup and namespace.
func newBenchWorkerCommand() *cobra.Command {
	return &cobra.Command{
		Use:    "worker",
		Short:  "Run one client or server of `sockredir bench` (started by it, not by hand)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE:   func(*cobra.Command, []string) error { return bench.RunWorker() },
	}
}

func writeBenchReport(rep *bench.Report, asJSON bool, chartPath string) error {
	if chartPath != "" {
		f, err := os.Create(chartPath)
		if err != nil {
			return fmt.Errorf("writing the chart: %w", err)
		}
		if err := errors.Join(rep.WriteSVG(f), f.Close()); err != nil {
			return fmt.Errorf("writing the chart %s: %w", chartPath, err)
		}
	}
	if asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	if err := rep.WriteText(os.Stdout); err != nil {
		return err
	}
	if chartPath != "" {
		fmt.Printf("\nchart: %s\n", chartPath)
	}
	return nil
}
