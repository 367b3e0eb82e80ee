package main

import (
	"encoding/json"
	"os"

	"github.com/spf13/cobra"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/doctor"
)

func newDoctorCommand() *cobra.Command {
	var opts doctor.Options
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Check whether this host can run sockredir, and say how to fix what is missing",
		Long:  "Checks the kernel, its configuration and BPF features, BTF, cgroup v2, the BPF filesystem, privileges and other sock_ops programs, changing nothing. Exits 1 when a check failed.",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			report := doctor.Run(opts)
			if asJSON {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				if err := enc.Encode(report); err != nil {
					return err
				}
			} else if err := report.WriteText(os.Stdout); err != nil {
				return err
			}
			if !report.OK {
				return doctor.ErrChecksFailed
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&opts.Cgroup, "cgroup", "", "cgroup v2 directory `up` would attach to (default: the root of the cgroup v2 hierarchy)")
	cmd.Flags().StringVar(&opts.PinDir, "pin-dir", datapath.DefaultPinDir, "BPF filesystem directory `up` would pin to")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
