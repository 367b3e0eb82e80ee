package main

import (
	"fmt"
	"os"
	"os/signal"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/daemon"
	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/localaddr"
)

// mapSizeUsage explains --map-size of up and daemon: 0 keeps the size of a
// datapath that is up.
var mapSizeUsage = fmt.Sprintf("`sockets` the sockhash holds, two per connection; more connections go the normal way "+
	"(default %d; a datapath that is up keeps its size)", datapath.DefaultMapSize)

// maxBacklogUsage explains --max-backlog, which daemon and run share.
const maxBacklogUsage = "redirected `bytes` a socket may have waiting before its connection goes on over TCP (0: four times the largest TCP receive buffer, net.ipv4.tcp_rmem)"

func newDaemonCommand(log func() *zap.Logger) *cobra.Command {
	var opts daemon.Options
	cmd := &cobra.Command{
		Use:   "daemon",
		Short: "Bring the datapath up and keep it current: local addresses, metrics, reload on SIGHUP",
		Long: "Runs `up`, then stays: follows address changes in this network namespace and in every one that a process " +
			"of the cgroup is in, serves Prometheus metrics, and reloads on SIGHUP. On SIGTERM or SIGINT it exits and " +
			"leaves the datapath attached and pinned, unless --down-on-exit.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts.Log = log()
			ctx, stop := signal.NotifyContext(cmd.Context(), unix.SIGTERM, unix.SIGINT)
			defer stop()
			reload := make(chan os.Signal, 1)
			signal.Notify(reload, unix.SIGHUP)
			defer signal.Stop(reload)
			opts.Reload = reload
			return daemon.Run(ctx, opts)
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.Base.Cgroup, "cgroup", "", "cgroup v2 directory to accelerate (default: the root of the cgroup v2 hierarchy)")
	f.StringVar(&opts.Base.PinDir, "pin-dir", datapath.DefaultPinDir, "BPF filesystem directory for the pins")
	f.Uint32Var(&opts.Base.MapSize, "map-size", 0, mapSizeUsage)
	f.StringVar(&opts.ConfigFile, "config", "", "YAML file with the redirect policy and tuning rules (see docs/policy.md), read at start and on SIGHUP")
	f.StringVar(&opts.MetricsAddr, "metrics-addr", "", "address to serve /metrics and /healthz on, e.g. 127.0.0.1:9494 (default: no metrics)")
	f.BoolVar(&opts.DownOnExit, "down-on-exit", false, "take the datapath down when the daemon exits, instead of leaving it pinned")
	f.DurationVar(&opts.DrainTimeout, "drain-timeout", datapath.DefaultDrainTimeout, "with --down-on-exit: how long to wait for applications to read what was redirected to them")
	f.DurationVar(&opts.Rescan, "rescan-interval", localaddr.DefaultRescan, "how often to look for network namespaces that joined or left the cgroup")
	f.Uint64Var(&opts.MaxBacklog, "max-backlog", 0, maxBacklogUsage)
	f.DurationVar(&opts.CheckInterval, "check-interval", datapath.DefaultCheckInterval, "how often to check the accelerated sockets' backlogs, and release connections back on TCP")
	return cmd
}
