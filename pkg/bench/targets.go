package bench

import (
	"fmt"
	"strings"
)

// Target is one of the goals sockredir is measured against (issue 4).
type Target struct {
	Goal     string `json:"goal"`
	Measured string `json:"measured"`
	Status   string `json:"status"` // met, not met, not measured
}

const (
	met         = "met"
	notMet      = "not met"
	notMeasured = "not measured"
)

// maxProgramShare is what "the programs' cost is small" means: their run
// time is at most this share of the operation they are part of (a 64 B
// round trip for sk_msg, a connection for sock_ops), both under sockredir.
const maxProgramShare = 0.05

func evaluateTargets(r *Report) []Target {
	return []Target{
		latencyTarget(r, TCP, 0.6),
		latencyTarget(r, Unix, 1.05),
		streamTarget(r, TCP, 1<<10, 1.0),
		streamTarget(r, Unix, 64<<10, 0.9),
		connectTarget(r),
		programCostTarget(r),
	}
}

// latencyTarget: request/response 64 B, one connection, sockredir's p50
// latency at most limit times cfg's.
func latencyTarget(r *Report, cfg Config, limit float64) Target {
	t := Target{Goal: fmt.Sprintf("request/response 64 B: p50 latency <= %v x %s", limit, cfg)}
	wr := r.result(Workload{Kind: RequestResponse, Size: 64, Conns: 1}.Name())
	ratio, err := pairedRatio(wr, Sockredir, cfg, roundP50)
	if err != nil {
		return err.apply(t)
	}
	t.Measured = fmt.Sprintf("%.2fx", ratio)
	t.Status = metIf(ratio <= limit)
	return t
}

// streamTarget: every single-connection stream of at least minSize bytes
// per write gets at least limit times cfg's throughput under sockredir.
func streamTarget(r *Report, cfg Config, minSize int, limit float64) Target {
	t := Target{Goal: fmt.Sprintf("streams, writes of %s..1MiB: >= %v x %s at every size", sizeName(minSize), limit, cfg)}
	var all []string
	worst, worstName, n := 0.0, "", 0
	for i := range r.Results {
		wr := &r.Results[i]
		w := wr.Workload
		if w.Kind != Stream || w.Conns != 1 || w.Size < minSize {
			continue
		}
		ratio, err := pairedRatio(wr, Sockredir, cfg, roundValue)
		if err == errFailedRuns {
			return err.apply(t)
		}
		if err != nil {
			continue
		}
		all = append(all, fmt.Sprintf("%s %s %.2fx", w.Method, sizeName(w.Size), ratio))
		if n == 0 || ratio < worst {
			worst, worstName = ratio, wr.Name
		}
		n++
	}
	if n == 0 {
		return errNotRun.apply(t)
	}
	t.Measured = fmt.Sprintf("worst %.2fx (%s); %s", worst, worstName, strings.Join(all, ", "))
	t.Status = metIf(worst >= limit)
	return t
}

// connectTarget: connect + request + close at least 0.95 x TCP, at every
// concurrency measured.
func connectTarget(r *Report) Target {
	const limit = 0.95
	t := Target{Goal: fmt.Sprintf("connect + request + close: >= %v x tcp", limit)}
	var all []string
	worst, n := 0.0, 0
	for i := range r.Results {
		wr := &r.Results[i]
		if wr.Workload.Kind != ConnectRequestClose {
			continue
		}
		ratio, err := pairedRatio(wr, Sockredir, TCP, roundValue)
		if err == errFailedRuns {
			return err.apply(t)
		}
		if err != nil {
			continue
		}
		all = append(all, fmt.Sprintf("c=%d %.2fx", wr.Workload.Conns, ratio))
		if n == 0 || ratio < worst {
			worst = ratio
		}
		n++
	}
	if n == 0 {
		return errNotRun.apply(t)
	}
	t.Measured = strings.Join(all, ", ")
	t.Status = metIf(worst >= limit)
	return t
}

// programCostTarget: the programs' run time per operation is a small
// share of the operation's latency.
func programCostTarget(r *Report) Target {
	t := Target{Goal: fmt.Sprintf("BPF programs' run time: <= %.0f%% of a 64 B round trip (sk_msg) and of a connection (sock_ops)", maxProgramShare*100)}
	rr := Workload{Kind: RequestResponse, Size: 64, Conns: 1}.Name()
	crr := Workload{Kind: ConnectRequestClose, Size: 64, Conns: 1}.Name()
	skMsg, okMsg := programShare(r, programSkMsg, rr)
	sockOps, okOps := programShare(r, programSockOps, crr)
	if !okMsg || !okOps {
		t.Status, t.Measured = notMeasured, "needs the program cost phase and rr 64B c=1 and crr 64B c=1 under sockredir"
		return t
	}
	t.Measured = fmt.Sprintf("sk_msg %s; sock_ops %s", skMsg, sockOps)
	t.Status = metIf(skMsg.share <= maxProgramShare && sockOps.share <= maxProgramShare)
	return t
}

// programUse is a program's run time in one operation, and its share of
// the operation's p50 latency.
type programUse struct {
	nsPerCall, callsPerOp, share float64
}

func (u programUse) String() string {
	return fmt.Sprintf("%.0f ns/call x %.1f calls = %.1f%%", u.nsPerCall, u.callsPerOp, u.share*100)
}

func programShare(r *Report, program, workload string) (programUse, bool) {
	wr := r.result(workload)
	if wr == nil {
		return programUse{}, false
	}
	c := wr.config(Sockredir)
	if c == nil || c.P50us == nil || c.P50us.N == 0 {
		return programUse{}, false
	}
	for _, pc := range r.ProgramCosts {
		if pc.Config == Sockredir && pc.Program == program && pc.Workload == workload && pc.Calls > 0 {
			u := programUse{nsPerCall: pc.NsPerCall, callsPerOp: pc.CallsPerOp}
			u.share = u.nsPerCall * u.callsPerOp / (c.P50us.Median * 1000)
			return u, true
		}
	}
	return programUse{}, false
}

// ratioError says why a target has no ratio.
type ratioError struct{ status, measured string }

var (
	errNotRun     = &ratioError{notMeasured, "the workload or configuration was not run"}
	errFailedRuns = &ratioError{notMet, "runs failed: see the errors"}
)

func (e *ratioError) apply(t Target) Target {
	t.Status, t.Measured = e.status, e.measured
	return t
}

// pairedRatio is the median over rounds of a's value divided by b's in the
// same round. A target is never met on partial data: if any round of
// either failed, there is no ratio.
func pairedRatio(wr *WorkloadResult, a, b Config, field func(RoundResult) float64) (float64, *ratioError) {
	if wr == nil {
		return 0, errNotRun
	}
	ca, cb := wr.config(a), wr.config(b)
	if ca == nil || cb == nil {
		return 0, errNotRun
	}
	if ca.failures() > 0 || cb.failures() > 0 {
		return 0, errFailedRuns
	}
	return Summarize(ratios(ca.series(field), cb.series(field))).Median, nil
}

func metIf(ok bool) string {
	if ok {
		return met
	}
	return notMet
}
