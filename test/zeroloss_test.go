package test

import (
	"fmt"
	"testing"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/test/harness"
)

// zeroLossCases run with and without sockredir under the same assertions:
// an application must not be able to tell the difference.
//
// accelerated says whether sockredir redirects the case's traffic; knownBad,
// when it returns a reason, marks a case that this kernel gets wrong under
// sockredir and that sockredir can't prevent here (docs/correctness.md).
var zeroLossCases = []struct {
	name        string
	bytes       int64
	accelerated bool
	knownBad    func(datapath.Status) string
	check       func(r *harness.CaseResult) []string // what an application would notice
}{
	// A blocking client is left on TCP (see bpf/sockops.c).
	{"half-close-blocking-client", 1 << 20, false, nil, checkIntactNoErrors},
	{"splice-relay", 8 << 20, true, func(st datapath.Status) string {
		if st.SpliceGuard {
			return ""
		}
		return "splice(2) can't read redirected bytes, and this kernel refuses the BPF LSM splice guard"
	}, checkIntactNoErrors},
	{"sendfile", 8 << 20, true, nil, checkIntactNoErrors},
	{"peek", 1 << 20, true, nil, func(r *harness.CaseResult) []string {
		problems := checkIntactNoErrors(r)
		if r.Values["peek_mismatches"] != 0 {
			problems = append(problems, fmt.Sprintf("%d peeks differed from the read that followed", r.Values["peek_mismatches"]))
		}
		return problems
	}},
	{"fionread", 1000, true, func(st datapath.Status) string {
		if st.Kernel.FIONREADCountsRedirected {
			return ""
		}
		return "FIONREAD ignores redirected bytes on this kernel: its tcp_bpf has no ioctl"
	}, func(r *harness.CaseResult) []string {
		problems := checkIntactNoErrors(r)
		if r.Values["fionread"] != 1000 {
			problems = append(problems, fmt.Sprintf("FIONREAD says %d bytes are waiting, want 1000", r.Values["fionread"]))
		}
		return problems
	}},
	{"rcvlowat", 1000, true, func(datapath.Status) string {
		return "tcp_bpf reports a socket readable when any redirected byte is queued, whatever SO_RCVLOWAT says"
	}, func(r *harness.CaseResult) []string {
		if r.Values["readable_below_lowat"] != 0 || r.Values["readable_at_lowat"] != 1 {
			return []string{fmt.Sprintf("SO_RCVLOWAT 1000: readable with 500 bytes: %d, with 1000: %d; want 0 and 1",
				r.Values["readable_below_lowat"], r.Values["readable_at_lowat"])}
		}
		return nil
	}},
	{"abortive-close", 1 << 20, true, nil, func(r *harness.CaseResult) []string {
		problems := checkIntactNoErrors(r)
		if r.Values["prefix_matches"] != 1 {
			problems = append(problems, fmt.Sprintf("after an RST the receiver read %d bytes that are not what was sent", r.Values["received"]))
		}
		return problems
	}},
}

func checkIntactNoErrors(r *harness.CaseResult) []string {
	var problems []string
	for who, err := range r.Errors {
		problems = append(problems, fmt.Sprintf("%s saw an error: %s", who, err))
	}
	for who, got := range r.Received {
		if !got.Intact() {
			problems = append(problems, fmt.Sprintf("%s read %d bytes (sha256 %.12s), want exactly the %d bytes sent",
				who, got.Bytes, got.SHA256, got.WantSize))
		}
	}
	return problems
}

func TestZeroLoss(t *testing.T) {
	for _, c := range zeroLossCases {
		for _, accelerated := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/%s", c.name, map[bool]string{false: "plain", true: "sockredir"}[accelerated]), func(t *testing.T) {
				e := harness.New(t)
				if accelerated {
					e.Up(datapath.Config{})
				}
				var r harness.CaseResult
				e.Run(harness.Scenario{Case: &harness.Case{Name: c.name, Bytes: c.bytes}}, &r)
				problems := c.check(&r)
				if accelerated {
					st := e.Status()
					if redirected := st.Counters.BytesRedirected > 0; redirected != c.accelerated {
						t.Errorf("accelerated: %v, want %v (counters %+v)", redirected, c.accelerated, st.Counters)
					}
					if reason := knownBad(c.knownBad, st); reason != "" {
						if len(problems) == 0 {
							t.Fatalf("known-bad case passed (%s): update docs/correctness.md", reason)
						}
						t.Skipf("KNOWN-BAD: %s: %v", reason, problems)
					}
				}
				for _, p := range problems {
					t.Error(p)
				}
			})
		}
	}
}

func knownBad(reason func(datapath.Status) string, st datapath.Status) string {
	if reason == nil {
		return ""
	}
	return reason(st)
}
