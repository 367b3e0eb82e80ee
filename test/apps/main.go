// Command apps compares plain TCP over loopback with sockredir, and with
// AF_UNIX where the tool has it, using tools people already trust: iperf3,
// sockperf, redis-benchmark, and wrk through haproxy (a sidecar) in front of
// nginx. Configurations are interleaved round by round inside a network
// namespace and cgroups of its own, which it removes afterwards. Every run
// checks the tool's own account of what arrived. `make bench-apps` runs it
// through test/apps/bench-apps.sh, which installs the tools.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/sockredir/sockredir/pkg/bench"
)

// result is one tool's metric under every configuration.
type result struct {
	Tool   string                   `json:"tool"`
	Metric string                   `json:"metric"`
	Lower  bool                     `json:"lower_is_better,omitempty"`
	Values map[config][]float64     `json:"values"`
	Median map[config]bench.Summary `json:"summary"`
	VsTCP  map[config]float64       `json:"vs_tcp,omitempty"`
}

// toolReport is what sockredir's counters say about a tool's runs.
type toolReport struct {
	Tool               string `json:"tool"`
	BytesRedirected    uint64 `json:"bytes_redirected"`
	BytesPassed        uint64 `json:"bytes_passed"`
	BlockingLeftOnTCP  uint64 `json:"blocking_clients_left_on_tcp"`
	SocketsAccelerated uint64 `json:"sockets_added"`
}

type report struct {
	Kernel   string       `json:"kernel"`
	Date     string       `json:"date"`
	Rounds   int          `json:"rounds"`
	Duration string       `json:"duration"`
	Results  []*result    `json:"results"`
	Paths    []toolReport `json:"sockredir_paths"`
	Errors   []string     `json:"errors,omitempty"`
}

func main() {
	rounds := flag.Int("rounds", 5, "rounds: every configuration runs every tool once per round")
	duration := flag.Duration("duration", 3*time.Second, "how long sockperf and wrk run (iperf3 and redis-benchmark are bounded by count)")
	only := flag.String("tools", "", "comma-separated tools to run (default all: iperf3,sockperf,redis,wrk-haproxy-nginx)")
	asJSON := flag.Bool("json", false, "print the report as JSON")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := run(ctx, *rounds, *duration, *only)
	if rep != nil {
		if *asJSON {
			enc := json.NewEncoder(os.Stdout)
			enc.SetIndent("", "  ")
			enc.Encode(rep)
		} else {
			rep.writeText()
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-apps:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, rounds int, d time.Duration, only string) (_ *report, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("needs root (it attaches sockredir to a cgroup of its own): run it with sudo")
	}
	selected, err := selectTools(only)
	if err != nil {
		return nil, err
	}
	e, err := newEnv()
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := e.close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("cleaning up: %w", cerr))
		}
	}()
	rep := &report{Kernel: kernelRelease(), Date: time.Now().UTC().Format(time.RFC3339), Rounds: rounds, Duration: d.String()}
	byKey := map[string]*result{}
	paths := map[string]*toolReport{}
	for round := range rounds {
		for _, t := range selected {
			for k := range t.configs {
				// Rotate the order, so that no configuration always runs first.
				cfg := t.configs[(round+k)%len(t.configs)]
				fmt.Fprintf(os.Stderr, "round %d/%d: %s, %s\n", round+1, rounds, t.name, cfg)
				before, cerr := e.counters()
				ms, err := t.run(ctx, e, cfg, d)
				if ctx.Err() != nil {
					return nil, errors.New("interrupted")
				}
				after, aerr := e.counters()
				if err := errors.Join(cerr, aerr); err != nil {
					return nil, err
				}
				if cfg == sockredir {
					p := paths[t.name]
					if p == nil {
						p = &toolReport{Tool: t.name}
						paths[t.name] = p
					}
					p.BytesRedirected += after.BytesRedirected - before.BytesRedirected
					p.BytesPassed += after.BytesPassed - before.BytesPassed
					p.BlockingLeftOnTCP += after.BlockingSkipped - before.BlockingSkipped
					p.SocketsAccelerated += after.SocketsAdded - before.SocketsAdded
				}
				if err != nil {
					rep.Errors = append(rep.Errors, fmt.Sprintf("round %d, %s, %s: %v", round+1, t.name, cfg, err))
					continue
				}
				for _, m := range ms {
					key := t.name + "\x00" + m.Name
					r := byKey[key]
					if r == nil {
						r = &result{Tool: t.name, Metric: m.Name, Lower: m.Lower, Values: map[config][]float64{}}
						byKey[key] = r
						rep.Results = append(rep.Results, r)
					}
					r.Values[cfg] = append(r.Values[cfg], m.Value)
				}
			}
		}
	}
	for _, t := range selected {
		if p := paths[t.name]; p != nil {
			rep.Paths = append(rep.Paths, *p)
		}
	}
	for _, r := range rep.Results {
		r.summarize()
	}
	if len(rep.Errors) > 0 {
		return rep, fmt.Errorf("%d runs failed: see the errors in the report", len(rep.Errors))
	}
	return rep, nil
}

func selectTools(only string) ([]tool, error) {
	if only == "" {
		return tools, nil
	}
	var out []tool
	for _, name := range strings.Split(only, ",") {
		found := false
		for _, t := range tools {
			if t.name == name {
				out, found = append(out, t), true
			}
		}
		if !found {
			return nil, fmt.Errorf("unknown tool %q: choose from iperf3, sockperf, redis, wrk-haproxy-nginx", name)
		}
	}
	return out, nil
}

// summarize takes medians; the ratio to TCP is the ratio of the medians,
// turned so that above 1 is better also for latencies.
func (r *result) summarize() {
	r.Median = map[config]bench.Summary{}
	r.VsTCP = map[config]float64{}
	for cfg, vs := range r.Values {
		r.Median[cfg] = bench.Summarize(vs)
	}
	base := r.Median[tcp].Median
	for cfg, s := range r.Median {
		if cfg == tcp || base == 0 || s.Median == 0 {
			continue
		}
		if r.Lower {
			r.VsTCP[cfg] = base / s.Median
		} else {
			r.VsTCP[cfg] = s.Median / base
		}
	}
}

func (rep *report) writeText() {
	fmt.Printf("bench-apps, %s, Linux %s: medians of %d interleaved rounds, %s per timed run\n", rep.Date, rep.Kernel, rep.Rounds, rep.Duration)
	fmt.Println("each cell: median ±spread (max-min)/median, and speed vs tcp (above 1x is better, also for latencies)")
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "tool\tmetric\ttcp\tsockredir\tunix\t")
	for _, r := range rep.Results {
		fmt.Fprintf(tw, "%s\t%s\t", r.Tool, r.Metric)
		for _, cfg := range []config{tcp, sockredir, unixSock} {
			s, ok := r.Median[cfg]
			if !ok || s.N == 0 {
				fmt.Fprint(tw, "-\t")
				continue
			}
			cell := fmt.Sprintf("%s ±%.0f%%", formatNumber(s.Median), s.Spread*100)
			if v, ok := r.VsTCP[cfg]; ok {
				cell += fmt.Sprintf(" %.2fx", v)
			}
			fmt.Fprintf(tw, "%s\t", cell)
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
	fmt.Println("\nWhat sockredir did in its runs (its counters):")
	tw = tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	for _, p := range rep.Paths {
		fmt.Fprintf(tw, "  %s\tsockets accelerated %d\tredirected %.1f MB\tpassed to TCP %.1f MB\tblocking clients left on TCP %d\n",
			p.Tool, p.SocketsAccelerated, float64(p.BytesRedirected)/1e6, float64(p.BytesPassed)/1e6, p.BlockingLeftOnTCP)
	}
	tw.Flush()
	if len(rep.Errors) > 0 {
		fmt.Printf("\n%d failed runs (left out of the numbers above):\n", len(rep.Errors))
		for _, e := range rep.Errors {
			fmt.Println("  " + e)
		}
	}
}

// formatNumber prints 46.2k rather than 4.621e+04.
func formatNumber(v float64) string {
	if v >= 1e4 {
		return fmt.Sprintf("%.3gk", v/1e3)
	}
	return fmt.Sprintf("%.4g", v)
}

func kernelRelease() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}
