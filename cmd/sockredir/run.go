package main

import (
	"fmt"
	"os"
	"os/signal"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/policy"
	"github.com/sockredir/sockredir/pkg/run"
)

func newRunCommand(log func() *zap.Logger) *cobra.Command {
	opts := run.Options{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	var configFile string
	cmd := &cobra.Command{
		Use:   "run [flags] -- COMMAND [ARGS...]",
		Short: "Accelerate one command and its children, nothing else",
		Long: "Runs COMMAND in a cgroup of its own with a datapath of its own; when it ends, takes the datapath down and " +
			"removes the cgroup. Processes the command leaves behind are killed. Exits with the command's status " +
			"(128+N when signal N killed it); signals sent to sockredir are passed on to the command. sockredir's own " +
			"failures exit with 125, a command that can't be started with 126, or 127 when it is not found.",
		Args: cobra.MinimumNArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			if configFile != "" {
				var err error
				if opts.Policy, err = policy.Load(configFile); err != nil {
					fmt.Fprintln(os.Stderr, "sockredir run:", err)
					os.Exit(run.ExitFailed)
				}
			}
			opts.Command = args
			opts.Log = log()
			signals := make(chan os.Signal, 8)
			signal.Notify(signals, run.ForwardedSignals...)
			opts.Signals = signals
			code, err := run.Run(opts)
			signal.Stop(signals)
			if err != nil {
				fmt.Fprintln(os.Stderr, "sockredir run:", err)
			}
			os.Exit(code)
			return nil
		},
	}
	cmd.Flags().SetInterspersed(false) // flags after COMMAND are the command's
	cmd.Flags().StringVar(&configFile, "config", "", "YAML file with the redirect policy and tuning rules (see docs/policy.md)")
	cmd.Flags().Uint32Var(&opts.MapSize, "map-size", datapath.DefaultMapSize, "sockets the sockhash holds (two per connection)")
	cmd.Flags().BoolVar(&opts.PassOnly, "pass-only", false, "pair sockets but send every message over TCP: measures what the hooks alone cost")
	cmd.Flags().Uint64Var(&opts.MaxBacklog, "max-backlog", 0, maxBacklogUsage)
	return cmd
}
