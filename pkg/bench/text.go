package bench

import (
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"
	"time"
)

// WriteText prints the report as tables for people.
func (r *Report) WriteText(w io.Writer) error {
	m := r.Machine
	fmt.Fprintf(w, "sockredir bench, %s: Linux %s, %s (%d CPUs), %d MiB, load %s at the start\n",
		m.Date, m.Kernel, m.CPU, m.CPUs, m.MemoryMB, m.LoadAvg)
	if r.Command != "" {
		fmt.Fprintf(w, "command: %s\n", r.Command)
	}
	fmt.Fprintf(w, "%d rounds, configurations interleaved; each run %v after a %v warm-up\n",
		r.Rounds, time.Duration(r.Duration), time.Duration(r.Warmup))
	fmt.Fprintln(w, "each cell: median, spread across rounds (max-min)/median, and median ratio to tcp in the same round")
	for _, c := range r.Configs {
		fmt.Fprintf(w, "  %-10s %s\n", c, c.Description())
	}
	for _, section := range []struct {
		title string
		kind  Kind
		field func(ConfigResult) (Summary, Summary)
	}{
		{"Request/response: transactions/s", RequestResponse, headline},
		{"Request/response: p50 latency in us (ratio < 1 is faster)", RequestResponse, p50Latency},
		{"Request/response: p99 latency in us", RequestResponse, p99Latency},
		{"Connect + request + close: connections/s", ConnectRequestClose, headline},
		{"Connect + request + close: p50 latency in us", ConnectRequestClose, p50Latency},
		{"One-way streams: Gbit/s at the receiver", Stream, headline},
	} {
		if err := r.writeSection(w, section.title, section.kind, section.field); err != nil {
			return err
		}
	}
	if err := r.writeProgramCosts(w); err != nil {
		return err
	}
	if len(r.Targets) > 0 {
		fmt.Fprintln(w, "\nTargets")
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		for _, t := range r.Targets {
			fmt.Fprintf(tw, "  %s\t%s\t%s\n", strings.ToUpper(t.Status), t.Goal, t.Measured)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if len(r.Errors) > 0 {
		fmt.Fprintf(w, "\n%d failed runs (left out of the numbers above):\n", len(r.Errors))
		for _, e := range r.Errors {
			fmt.Fprintf(w, "  %s\n", e)
		}
	}
	return nil
}

// headline and the latency fields pick a value and its ratio to TCP.
func headline(c ConfigResult) (Summary, Summary) { return c.Value, c.VsTCP }

func p50Latency(c ConfigResult) (Summary, Summary) {
	if c.P50us == nil {
		return Summary{}, Summary{}
	}
	return *c.P50us, *c.P50VsTCP
}

func p99Latency(c ConfigResult) (Summary, Summary) {
	if c.P99us == nil {
		return Summary{}, Summary{}
	}
	return *c.P99us, Summary{}
}

func (r *Report) writeSection(w io.Writer, title string, kind Kind, field func(ConfigResult) (Summary, Summary)) error {
	var rows []WorkloadResult
	for _, wr := range r.Results {
		if wr.Workload.Kind == kind {
			rows = append(rows, wr)
		}
	}
	if len(rows) == 0 {
		return nil
	}
	fmt.Fprintf(w, "\n%s\n", title)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "workload\t")
	for _, c := range r.Configs {
		fmt.Fprintf(tw, "%s\t", c)
	}
	fmt.Fprintln(tw)
	for _, wr := range rows {
		fmt.Fprintf(tw, "%s\t", wr.Name)
		for _, cfg := range r.Configs {
			c := wr.config(cfg)
			if c == nil {
				fmt.Fprint(tw, "-\t")
				continue
			}
			value, ratio := field(*c)
			fmt.Fprintf(tw, "%s\t", formatCell(value, ratio, cfg != TCP, c.failures()))
		}
		fmt.Fprintln(tw)
	}
	return tw.Flush()
}

// formatCell is "12.3k ±4% 1.52x", with the number of failed rounds if any.
func formatCell(value, ratio Summary, withRatio bool, failures int) string {
	if value.N == 0 {
		return "FAILED"
	}
	s := fmt.Sprintf("%s ±%.0f%%", formatValue(value.Median, value.N), value.Spread*100)
	if withRatio && ratio.N > 0 {
		s += fmt.Sprintf(" %.2fx", ratio.Median)
	}
	if failures > 0 {
		s += fmt.Sprintf(" (%d failed)", failures)
	}
	return s
}

// formatValue prints a number with three significant digits and k/M.
func formatValue(v float64, n int) string {
	switch {
	case n == 0:
		return "FAILED"
	case math.Abs(v) >= 1e6:
		return trim3(v/1e6) + "M"
	case math.Abs(v) >= 1e4:
		return trim3(v/1e3) + "k"
	}
	return trim3(v)
}

func trim3(v float64) string {
	switch {
	case math.Abs(v) >= 100:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

func (r *Report) writeProgramCosts(w io.Writer) error {
	if len(r.ProgramCosts) == 0 {
		return nil
	}
	fmt.Fprintln(w, "\nBPF programs' run time (bpf_stats, in a phase of its own; op = transaction, connection or write)")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "config\tworkload\tprogram\tcalls\tcalls/op\tns/call\tbytes/call\t")
	for _, c := range r.ProgramCosts {
		perCall := "-"
		if c.BytesPerCall > 0 {
			perCall = fmt.Sprintf("%.0f", c.BytesPerCall)
		}
		ns := "-"
		if c.Calls > 0 {
			ns = fmt.Sprintf("%.0f", c.NsPerCall)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%.2f\t%s\t%s\t\n", c.Config, c.Workload, c.Program, c.Calls, c.CallsPerOp, ns, perCall)
	}
	return tw.Flush()
}
