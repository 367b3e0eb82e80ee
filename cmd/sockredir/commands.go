package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/policy"
)

func newUpCommand(log func() *zap.Logger) *cobra.Command {
	var cfg datapath.Config
	var configFile string
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Attach the datapath to a cgroup and pin it (upgrades in place if already up)",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) (err error) {
			if configFile != "" {
				if cfg.Policy, err = policy.Load(configFile); err != nil {
					return err
				}
			}
			cfg.Log = log()
			res, err := upUninterrupted(cfg)
			if err == nil && res == datapath.Attached {
				cfg.Log.Info("no upkeep runs with up alone: `sockredir daemon` also holds back readers that fall behind " +
					"(without it their senders may get ENOMEM), catches servers that turn to blocking reads or splice " +
					"after their port was cleared, and follows address changes")
			}
			return err
		},
	}
	cmd.Flags().StringVar(&configFile, "config", "", "YAML file with the redirect policy and tuning rules (see docs/policy.md)")
	cmd.Flags().StringVar(&cfg.Cgroup, "cgroup", "", "cgroup v2 directory to accelerate (default: the root of the cgroup v2 hierarchy)")
	cmd.Flags().StringVar(&cfg.PinDir, "pin-dir", datapath.DefaultPinDir, "BPF filesystem directory for the pins")
	cmd.Flags().Uint32Var(&cfg.MapSize, "map-size", 0, mapSizeUsage)
	return cmd
}

// upUninterrupted runs datapath.Up with SIGINT, SIGTERM and SIGHUP held:
// killed half-way, it would leave pins and guards behind. A signal ends only
// a wait for another up or down; one that came later is reported once the
// datapath is whole.
func upUninterrupted(cfg datapath.Config) (datapath.UpResult, error) {
	ctx, stop := signal.NotifyContext(context.Background(), unix.SIGINT, unix.SIGTERM, unix.SIGHUP)
	res, err := datapath.UpContext(ctx, cfg)
	interrupted := ctx.Err() != nil
	stop()
	if interrupted && err == nil {
		err = fmt.Errorf("interrupted while up ran, which finished first: run `sockredir down --pin-dir %s` to detach", cfg.PinDir)
	}
	return res, err
}

func newDownCommand(log func() *zap.Logger) *cobra.Command {
	var opts datapath.DownOptions
	cmd := &cobra.Command{
		Use:   "down",
		Short: "Stop accelerating, let readers drain, then detach and unpin everything",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			opts.Log = log()
			wasUp, err := datapath.Down(opts)
			if err == nil && !wasUp {
				log().Info("nothing to do: sockredir is not up", zap.String("pin_dir", opts.PinDir))
			}
			return err
		},
	}
	cmd.Flags().StringVar(&opts.PinDir, "pin-dir", datapath.DefaultPinDir, "BPF filesystem directory of the pins")
	cmd.Flags().DurationVar(&opts.DrainTimeout, "drain-timeout", datapath.DefaultDrainTimeout,
		"how long to wait for applications to read what was redirected to them")
	return cmd
}

func newStatusCommand() *cobra.Command {
	var pinDir string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Say what is attached and what it has done",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			st, err := datapath.ReadStatus(pinDir)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			return st.WriteText(os.Stdout)
		},
	}
	cmd.Flags().StringVar(&pinDir, "pin-dir", datapath.DefaultPinDir, "BPF filesystem directory of the pins")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newVersionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		Run: func(*cobra.Command, []string) {
			fmt.Println("sockredir", version)
		},
	}
}
