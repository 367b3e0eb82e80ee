package bench

import (
	"fmt"
	"math"
	"strings"
	"time"
)

// Report is everything a benchmark run found.
type Report struct {
	Machine  Machine          `json:"machine"`
	Command  string           `json:"command,omitempty"`
	Version  string           `json:"version,omitempty"`
	Rounds   int              `json:"rounds"`
	Warmup   Duration         `json:"warmup"`
	Duration Duration         `json:"duration"`
	Configs  []Config         `json:"configs"`
	Results  []WorkloadResult `json:"results"`
	// ProgramCosts are the BPF programs' run time per call, measured in a
	// phase of its own (bpf_stats slows every program run down).
	ProgramCosts []ProgramCost `json:"program_costs,omitempty"`
	Targets      []Target      `json:"targets,omitempty"`
	Errors       []string      `json:"errors,omitempty"`
}

// Duration is a time.Duration that reads well in JSON ("250ms").
type Duration time.Duration

func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	*d = Duration(v)
	return err
}

// WorkloadResult is one workload under every configuration.
type WorkloadResult struct {
	Workload Workload       `json:"workload"`
	Name     string         `json:"name"`
	Metric   string         `json:"metric"`
	Configs  []ConfigResult `json:"configs"`
}

// ConfigResult is one workload under one configuration, over the rounds.
type ConfigResult struct {
	Config Config        `json:"config"`
	Rounds []RoundResult `json:"rounds"`
	// Value summarizes the workload's metric; P50us and P99us the latency
	// percentiles (rr and crr only).
	Value Summary  `json:"value"`
	P50us *Summary `json:"p50_us,omitempty"`
	P99us *Summary `json:"p99_us,omitempty"`
	// VsTCP is the metric divided by TCP's in the same round (higher is
	// better); P50VsTCP the p50 latency divided by TCP's (lower is better).
	VsTCP    Summary  `json:"vs_tcp"`
	P50VsTCP *Summary `json:"p50_vs_tcp,omitempty"`
}

// RoundResult is one run.
type RoundResult struct {
	Value float64 `json:"value"`
	// Bytes is what the run carried, both ways.
	Bytes int64   `json:"bytes"`
	P50us float64 `json:"p50_us,omitempty"`
	P99us float64 `json:"p99_us,omitempty"`
	// Error says why the run failed; its numbers are then left out.
	Error string `json:"error,omitempty"`
}

// nanIfFailed is a round's value for statistics: NaN when it failed.
func (rr RoundResult) nanIfFailed(v float64) float64 {
	if rr.Error != "" {
		return math.NaN()
	}
	return v
}

func (c *ConfigResult) failures() int {
	n := 0
	for _, r := range c.Rounds {
		if r.Error != "" {
			n++
		}
	}
	return n
}

func (c *ConfigResult) series(field func(RoundResult) float64) []float64 {
	out := make([]float64, len(c.Rounds))
	for i, r := range c.Rounds {
		out[i] = r.nanIfFailed(field(r))
	}
	return out
}

func roundValue(r RoundResult) float64 { return r.Value }
func roundP50(r RoundResult) float64   { return r.P50us }
func roundP99(r RoundResult) float64   { return r.P99us }

// summarize fills in the summaries and the ratios to TCP.
func (wr *WorkloadResult) summarize() {
	tcp := wr.config(TCP)
	for i := range wr.Configs {
		c := &wr.Configs[i]
		c.Value = Summarize(c.series(roundValue))
		c.VsTCP = Summarize(ratios(c.series(roundValue), tcp.series(roundValue)))
		if !wr.Workload.hasLatency() {
			continue
		}
		p50, p99 := Summarize(c.series(roundP50)), Summarize(c.series(roundP99))
		p50Ratio := Summarize(ratios(c.series(roundP50), tcp.series(roundP50)))
		c.P50us, c.P99us, c.P50VsTCP = &p50, &p99, &p50Ratio
	}
}

// config returns the result of cfg, or nil if it did not run.
func (wr *WorkloadResult) config(cfg Config) *ConfigResult {
	for i := range wr.Configs {
		if wr.Configs[i].Config == cfg {
			return &wr.Configs[i]
		}
	}
	return nil
}

// oneLine is the workload's medians, for the progress output.
func (wr *WorkloadResult) oneLine() string {
	var parts []string
	for _, c := range wr.Configs {
		parts = append(parts, fmt.Sprintf("%s %s", c.Config, formatValue(c.Value.Median, c.Value.N)))
	}
	return strings.Join(parts, ", ") + " " + wr.Metric
}

func newReport(opts Options) *Report {
	return &Report{
		Machine:  describeMachine(),
		Command:  opts.Command,
		Version:  opts.Version,
		Rounds:   opts.Rounds,
		Warmup:   Duration(opts.Warmup),
		Duration: Duration(opts.Duration),
		Configs:  opts.Configs,
	}
}

// finish collects the failed runs and evaluates the targets.
func (r *Report) finish() {
	for _, wr := range r.Results {
		for _, c := range wr.Configs {
			for i, round := range c.Rounds {
				if round.Error != "" {
					r.Errors = append(r.Errors, fmt.Sprintf("%s, %s, round %d: %s", wr.Name, c.Config, i+1, round.Error))
				}
			}
		}
	}
	r.Targets = evaluateTargets(r)
}

// result returns the workload's result by name, or nil.
func (r *Report) result(name string) *WorkloadResult {
	for i := range r.Results {
		if r.Results[i].Name == name {
			return &r.Results[i]
		}
	}
	return nil
}
