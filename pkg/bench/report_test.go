package bench

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"io"
	"strings"
	"testing"
)

// fakeReport builds a report as Run would from the given rounds per
// workload and configuration.
func fakeReport(rounds map[string]map[Config][]RoundResult, workloads ...Workload) *Report {
	r := &Report{Machine: Machine{Kernel: "6.18.44", CPU: "Test CPU", CPUs: 2, Date: "2026-11-24T00:00:00Z"},
		Rounds: 3, Configs: AllConfigs}
	for _, w := range workloads {
		wr := WorkloadResult{Workload: w, Name: w.Name(), Metric: w.Metric()}
		for _, cfg := range AllConfigs {
			wr.Configs = append(wr.Configs, ConfigResult{Config: cfg, Rounds: rounds[w.Name()][cfg]})
		}
		wr.summarize()
		r.Results = append(r.Results, wr)
	}
	r.ProgramCosts = []ProgramCost{
		{Config: Sockredir, Workload: "rr 64B c=1", Program: programSkMsg, Calls: 1000, NsPerCall: 80, BytesPerCall: 64},
		{Config: Sockredir, Workload: "crr 64B c=1", Program: programSockOps, Calls: 500, NsPerCall: 250},
	}
	r.finish()
	return r
}

var (
	rr64     = Workload{Kind: RequestResponse, Size: 64, Conns: 1}
	stream1K = Workload{Kind: Stream, Method: Write, Size: 1 << 10, Conns: 1}
)

func rrRounds(p50 ...float64) []RoundResult {
	var out []RoundResult
	for _, p := range p50 {
		out = append(out, RoundResult{Value: 1e6 / p, P50us: p, P99us: 3 * p})
	}
	return out
}

func streamRounds(gbps ...float64) []RoundResult {
	var out []RoundResult
	for _, g := range gbps {
		out = append(out, RoundResult{Value: g})
	}
	return out
}

func sampleReport() *Report {
	return fakeReport(map[string]map[Config][]RoundResult{
		rr64.Name(): {
			TCP:       rrRounds(20, 22, 21),
			Sockredir: rrRounds(11, 12, 11),
			HookOnly:  rrRounds(21, 23, 22),
			Unix:      rrRounds(11, 11, 12),
		},
		stream1K.Name(): {
			TCP:       streamRounds(3, 3.3, 3.1),
			Sockredir: append(streamRounds(6, 6.2), RoundResult{Error: "bytes received differ from bytes sent: the client sent 10 bytes, the server received 9"}),
			HookOnly:  streamRounds(2.9, 3, 3.1),
			Unix:      streamRounds(5, 5, 5),
		},
	}, rr64, stream1K)
}

func TestReportRatiosAndTargets(t *testing.T) {
	r := sampleReport()
	rr := r.result(rr64.Name()).config(Sockredir)
	// Per round: 11/20, 12/22, 11/21; the median of those, not 11/21.
	if rr.P50VsTCP == nil || rr.P50VsTCP.Median != 12.0/22 {
		t.Errorf("p50 ratio to tcp = %+v, want the median of the per-round ratios, 12/22", rr.P50VsTCP)
	}
	targets := map[string]Target{}
	for _, tg := range r.Targets {
		targets[tg.Goal] = tg
	}
	for goal, want := range map[string]string{
		"request/response 64 B: p50 latency <= 0.6 x tcp":                                            met,
		"request/response 64 B: p50 latency <= 1.05 x unix":                                          met,
		"streams, writes of 1KiB..1MiB: >= 1 x tcp at every size":                                    notMet,
		"streams, writes of 64KiB..1MiB: >= 0.9 x unix at every size":                                notMeasured,
		"BPF programs' run time: <= 5% of a 64 B round trip (sk_msg) and of a connection (sock_ops)": notMeasured, // no crr run
		"connect + request + close: >= 0.95 x tcp":                                                   notMeasured,
	} {
		if got := targets[goal].Status; got != want {
			t.Errorf("target %q: %q (%s), want %q", goal, got, targets[goal].Measured, want)
		}
	}
	if got := targets["streams, writes of 1KiB..1MiB: >= 1 x tcp at every size"].Measured; !strings.Contains(got, "runs failed") {
		t.Errorf("a target over a workload that lost bytes must say so, got %q", got)
	}
}

func TestFailedRunIsAnErrorNotAResult(t *testing.T) {
	r := sampleReport()
	if len(r.Errors) != 1 || !strings.Contains(r.Errors[0], "stream write 1KiB c=1, sockredir, round 3: bytes received differ") {
		t.Fatalf("want the lost bytes listed as the one error, got %q", r.Errors)
	}
	c := r.result(stream1K.Name()).config(Sockredir)
	if c.Value.N != 2 || c.Value.Median != 6.1 {
		t.Errorf("the failed round must be left out of the median: %+v", c.Value)
	}
	var text bytes.Buffer
	if err := r.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"(1 failed)", "1 failed runs (left out of the numbers above)", "bytes received differ from bytes sent"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("the text report lacks %q:\n%s", want, text.String())
		}
	}
}

func TestWriteText(t *testing.T) {
	var b bytes.Buffer
	if err := sampleReport().WriteText(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"Linux 6.18.44, Test CPU (2 CPUs)",
		"Request/response: transactions/s",
		"Request/response: p50 latency in us",
		"One-way streams: Gbit/s at the receiver",
		"rr 64B c=1",
		"11.0 ±9% 0.55x", // sockredir's p50 and its ratio to tcp
		"47.6k ±10% ",    // tcp's transactions/s: 1e6/21, spread (1e6/20-1e6/22)/(1e6/21)
		"sk_msg",
		"MET",
		"NOT MET",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the text report lacks %q:\n%s", want, out)
		}
	}
}

func TestReportJSONRoundTrip(t *testing.T) {
	r := sampleReport()
	data, err := json.Marshal(r)
	if err != nil {
		t.Fatalf("a report with a failed round must still encode: %v", err)
	}
	var back Report
	if err := json.Unmarshal(data, &back); err != nil {
		t.Fatal(err)
	}
	if len(back.Results) != 2 || back.Results[0].Configs[1].VsTCP.Median != r.Results[0].Configs[1].VsTCP.Median {
		t.Errorf("the JSON report does not round-trip: %s", data)
	}
}

func TestWriteSVG(t *testing.T) {
	var b bytes.Buffer
	if err := sampleReport().WriteSVG(&b); err != nil {
		t.Fatal(err)
	}
	dec := xml.NewDecoder(&b)
	bars, failed := 0, 0
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("the chart is not well-formed XML: %v", err)
		}
		switch el := tok.(type) {
		case xml.StartElement:
			if el.Name.Local == "rect" && len(el.Attr) > 0 {
				for _, a := range el.Attr {
					if a.Name.Local == "fill" && a.Value == chartColors[Sockredir] {
						bars++
					}
				}
			}
		case xml.CharData:
			if string(el) == "failed" {
				failed++
			}
		}
	}
	// One bar per workload, one legend entry; the failed stream shows as failed.
	if bars != 2 || failed != 1 {
		t.Errorf("want 1 sockredir bar, 1 legend swatch and 1 failed marker, got %d sockredir rects and %d failed", bars, failed)
	}
}

func TestSelectWorkloads(t *testing.T) {
	ws, err := SelectWorkloads(DefaultWorkloads(false), `^stream sendfile`)
	if err != nil || len(ws) != 3 {
		t.Fatalf("want the 3 sendfile streams, got %v, %v", ws, err)
	}
	if _, err := SelectWorkloads(DefaultWorkloads(false), `nothing-matches`); err == nil {
		t.Error("a pattern that matches nothing must be an error")
	}
	if _, err := SelectWorkloads(DefaultWorkloads(false), `(`); err == nil {
		t.Error("an invalid pattern must be an error")
	}
}

func TestWorkloadNames(t *testing.T) {
	seen := map[string]bool{}
	for _, w := range append(DefaultWorkloads(false), DefaultWorkloads(true)...) {
		seen[w.Name()] = true
	}
	for _, want := range []string{"rr 1B c=1", "rr 64KiB c=1", "crr 64B c=256", "stream write 1MiB c=1", "stream sendfile 64KiB c=1"} {
		if !seen[want] {
			t.Errorf("no workload named %q", want)
		}
	}
}
