// Command sockredir accelerates TCP between sockets on the same host: see
// README.md. It only parses flags; the work is done by the packages in pkg/.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sockredir/sockredir/pkg/run"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	cmd, err := newRootCommand().ExecuteC()
	if err != nil {
		fmt.Fprintln(os.Stderr, "sockredir:", err)
		// `run` exits with its command's status: its own failures,
		// bad flags included, must not look like one.
		if cmd.Name() == "run" {
			os.Exit(run.ExitFailed)
		}
		os.Exit(1)
	}
}

func newRootCommand() *cobra.Command {
	var logFormat string
	var log *zap.Logger
	root := &cobra.Command{
		Use:           "sockredir",
		Short:         "Accelerate TCP between sockets on this host with sock_ops and sk_msg",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(*cobra.Command, []string) (err error) {
			log, err = newLogger(logFormat)
			return err
		},
	}
	root.PersistentFlags().StringVar(&logFormat, "log-format", "console", "log format: console or json")
	logger := func() *zap.Logger { return log }
	root.AddCommand(
		newUpCommand(logger), newDownCommand(logger), newStatusCommand(),
		newDaemonCommand(logger), newRunCommand(logger), newDoctorCommand(),
		newTraceCommand(logger), newBenchCommand(logger), newVersionCommand(),
	)
	return root
}

func newLogger(format string) (*zap.Logger, error) {
	var enc zapcore.Encoder
	switch format {
	case "console":
		cfg := zap.NewDevelopmentEncoderConfig()
		cfg.EncodeLevel = zapcore.CapitalColorLevelEncoder
		enc = zapcore.NewConsoleEncoder(cfg)
	case "json":
		enc = zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	default:
		return nil, fmt.Errorf("--log-format must be console or json, not %q", format)
	}
	return zap.New(zapcore.NewCore(enc, zapcore.Lock(os.Stderr), zapcore.InfoLevel)), nil
}
