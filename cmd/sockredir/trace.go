package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/trace"
)

func newTraceCommand(log func() *zap.Logger) *cobra.Command {
	var opts trace.Options
	var addr string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "trace",
		Short: "Stream the TCP events of the connections in the attached cgroup until interrupted",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if addr != "" {
				prefix, err := trace.ParseAddr(addr)
				if err != nil {
					return fmt.Errorf("--addr: %w", err)
				}
				opts.Addr = prefix
			}
			format := trace.Text
			if asJSON {
				format = trace.JSON
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return trace.Run(ctx, opts, format, os.Stdout, log())
		},
	}
	cmd.Flags().StringVar(&opts.PinDir, "pin-dir", datapath.DefaultPinDir, "BPF filesystem directory of the running datapath's pins")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per event")
	cmd.Flags().Uint16Var(&opts.Port, "port", 0, "only sockets with this local or remote port")
	cmd.Flags().StringVar(&addr, "addr", "", "only sockets with a local or remote address in this CIDR prefix (or equal to this address)")
	return cmd
}
