package test

import (
	"fmt"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/test/harness"
)

// zeroLossCases run with and without sockredir under the same assertions:
// an application must not be able to tell the difference. They run without
// probation (the harness's default), so that their one server's first
// connection is accelerated: probation_test.go runs the cases it changes.
//
// accelerated says whether sockredir redirects the case's traffic; knownBad,
// when it returns a reason, marks a case that this kernel gets wrong under
// sockredir and that sockredir can't prevent here (docs/correctness.md);
// what always checks must hold even then.
var zeroLossCases = []struct {
	name        string
	bytes       int64
	accelerated bool
	knownBad    func(datapath.Status) string
	check       func(r *harness.CaseResult) []string // what an application would notice
	always      func(r *harness.CaseResult) []string
}{
	// A blocking client is left on TCP (see bpf/sockops.c).
	{"half-close-blocking-client", 1 << 20, false, nil, checkIntactNoErrors, nil},
	{"splice-relay", 8 << 20, true, func(st datapath.Status) string {
		if st.SpliceGuard {
			return ""
		}
		return "splice(2) can't read redirected bytes, and this kernel refuses the BPF LSM splice guard: " +
			"without probation, the splice watch puts the relay's ports on TCP once the first connection has spliced, " +
			"and the upkeep aborts that connection"
	}, checkIntactNoErrors, func(r *harness.CaseResult) []string {
		// Where the first connection is known-bad, it must fail loudly
		// (its client waits for its answer, and the upkeep aborts it),
		// and the splice watch has put both server ports on TCP for the
		// next one.
		problems := checkIntactNoErrors(r.Only(" next connection"))
		if got := r.Received["client"]; !got.Intact() && r.Errors["client"] == "" {
			problems = append(problems, fmt.Sprintf("the first connection's client read %d of %d bytes and saw no error",
				got.Bytes, got.WantSize))
		}
		return problems
	}},
	// A reader built on io_uring: IORING_OP_SPLICE, not the system call,
	// from the socket's descriptor or its index among the ring's
	// registered files.
	{"io-uring-splice-reader", 1 << 20, true, ioUringSpliceKnownBad, checkIntactNoErrors, nil},
	{"io-uring-fixed-splice-reader", 1 << 20, true, ioUringSpliceKnownBad, checkIntactNoErrors, nil},
	{"sendfile", 8 << 20, true, nil, checkIntactNoErrors, nil},
	{"peek", 1 << 20, true, nil, func(r *harness.CaseResult) []string {
		problems := checkIntactNoErrors(r)
		if r.Values["peek_mismatches"] != 0 {
			problems = append(problems, fmt.Sprintf("%d peeks differed from the read that followed", r.Values["peek_mismatches"]))
		}
		return problems
	}, nil},
	{"fionread", 1000, true, func(st datapath.Status) string {
		if st.Kernel.FIONREADCountsRedirected {
			return ""
		}
		return "FIONREAD ignores redirected bytes on this kernel (its tcp_bpf has no ioctl): " +
			"without probation, the first FIONREAD on a server port undercounts"
	}, func(r *harness.CaseResult) []string {
		problems := checkIntactNoErrors(r)
		if r.Values["fionread"] != 1000 {
			problems = append(problems, fmt.Sprintf("FIONREAD says %d bytes are waiting, want 1000", r.Values["fionread"]))
		}
		return problems
	}, func(r *harness.CaseResult) []string {
		// Where the first connection is known-bad, the guard has put
		// the port on TCP by now.
		if n := r.Values["fionread_next_connection"]; n != 1000 {
			return []string{fmt.Sprintf("on the next connection to the port FIONREAD says %d bytes are waiting, want 1000", n)}
		}
		return nil
	}},
	// A receiver that sets SO_RCVLOWAT gets its bytes over TCP: tcp_bpf
	// would report it readable with any byte waiting.
	{"rcvlowat", 1000, false, nil, checkLowat, nil},
	{"rcvlowat-before-connect", 1000, false, nil, checkLowat, nil},
	{"rcvlowat-after-data", 1000, true, nil, checkLowat, nil},
	{"epoll-level-rdhup", 4 << 20, true, nil, func(r *harness.CaseResult) []string {
		problems := checkIntactNoErrors(r)
		if n := r.Values["eagain_after_epollin"]; n != 0 {
			problems = append(problems, fmt.Sprintf("%d reads after EPOLLIN failed with EAGAIN", n))
		}
		if r.Values["rdhup"] != 1 {
			problems = append(problems, "no EPOLLRDHUP at the end of the stream")
		}
		return problems
	}, nil},
	// One client socket, two connections (connect(2) with AF_UNSPEC in
	// between): the second server gets the second connection's bytes,
	// the client reads only the second answer.
	{"reconnect", 1 << 20, true, nil, checkReconnect, nil},
	// TCP urgent data (telnet, FTP's ABOR): tcp_bpf knows nothing of it.
	{"urgent-data", 0, true, func(datapath.Status) string {
		return "tcp_bpf redirects a MSG_OOB send's byte inline, and recv(MSG_OOB) takes a redirected byte instead: " +
			"leave such ports to TCP with the policy (exclude_ports)"
	}, func(r *harness.CaseResult) []string {
		problems := checkIntactNoErrors(r)
		if r.Texts["stream"] != "abde" || r.Texts["urgent"] != "c" {
			problems = append(problems, fmt.Sprintf("read %q in the stream and %q as urgent data, want \"abde\" and \"c\"",
				r.Texts["stream"], r.Texts["urgent"]))
		}
		return problems
	}, nil},
	{"abortive-close", 1 << 20, true, nil, func(r *harness.CaseResult) []string {
		problems := checkIntactNoErrors(r)
		if r.Values["prefix_matches"] != 1 || r.Values["received"] == 0 {
			problems = append(problems, fmt.Sprintf("after an RST the receiver read %d bytes, intact %v; "+
				"want a prefix of what was sent, with what was queued before the RST", r.Values["received"], r.Values["prefix_matches"] == 1))
		}
		return problems
	}, nil},
}

func ioUringSpliceKnownBad(st datapath.Status) string {
	if st.SpliceGuard {
		return ""
	}
	return "io_uring's splice can't read redirected bytes, and this kernel refuses the BPF LSM splice guard: " +
		"without probation, a reader whose client has finished before it splices gets nothing and EOF, " +
		"and the watch marks the port only when the reader sends or at the upkeep"
}

func checkReconnect(r *harness.CaseResult) []string {
	problems := checkIntactNoErrors(r)
	if n := r.Values["first_server_extra"]; n != 0 {
		problems = append(problems, fmt.Sprintf("the first server read %d bytes sent after the client left it", n))
	}
	if err := r.Texts["write while unconnected"]; err != unix.EPIPE.Error() {
		problems = append(problems, fmt.Sprintf("a write between the connections: error %q, want %q", err, unix.EPIPE.Error()))
	}
	return problems
}

func checkLowat(r *harness.CaseResult) []string {
	if r.Values["readable_below_lowat"] != 0 || r.Values["readable_at_lowat"] != 1 {
		return []string{fmt.Sprintf("SO_RCVLOWAT 1000: readable with 500 bytes: %d, with 1000: %d; want 0 and 1",
			r.Values["readable_below_lowat"], r.Values["readable_at_lowat"])}
	}
	return nil
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

// A client socket that reconnects to a server sockredir leaves alone (here
// by policy) sends its bytes there and reads only that server's answer.
func TestReconnectToAPortLeftOnTCP(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{Policy: mustParse(t, "redirect:\n  exclude_ports: [7431]\n")})
	var r harness.CaseResult
	e.Run(harness.Scenario{Case: &harness.Case{Name: "reconnect", Bytes: 1 << 20, Target: "127.0.0.1:7431"}}, &r)
	for _, p := range checkReconnect(&r) {
		t.Error(p)
	}
	if c := e.Status().Counters; c.BytesRedirected == 0 || c.PolicySkipped != 1 {
		t.Errorf("counters %+v: want the first connection redirected and the second left to TCP by the policy", c)
	}
}

// A reader that begins to splice(2) before its peer's first message (a
// relay waiting for its upstream's answer) gets the whole answer, on every
// kernel: the splice guard makes splice fail and the reader fall back to
// read(2); where it can't load, the splice watch sees the splice begin, and
// the peer, which has sent nothing yet, sends over TCP, which splice reads.
func TestSpliceBeforeFirstReply(t *testing.T) {
	for _, accelerated := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "sockredir"}[accelerated], func(t *testing.T) {
			e := harness.New(t)
			if accelerated {
				e.Up(datapath.Config{})
			}
			var r harness.CaseResult
			e.Run(harness.Scenario{Case: &harness.Case{Name: "splice-before-reply", Bytes: 8 << 20}}, &r)
			for _, p := range checkIntactNoErrors(&r) {
				t.Error(p)
			}
			if !accelerated {
				return
			}
			st := e.Status()
			if !st.SpliceGuard && (st.Counters.BytesRedirected != 0 || st.Counters.PairsDeclined != 1) {
				t.Errorf("without the splice guard, want the answer declined to TCP and nothing redirected; counters %+v", st.Counters)
			}
			if st.SpliceGuard && r.Values["read fallback"] != 1 {
				t.Errorf("with the splice guard, want the reader to fall back to read(2); it did %d times", r.Values["read fallback"])
			}
		})
	}
}

// A client that sends its request in its SYN (TCP Fast Open) is paired
// only with the server socket that the same handshake made, or stays out
// with it: never alone in the map, where tcp_bpf would answer FIONREAD for
// its TCP bytes (0 on some kernels). With the request taken from the SYN,
// the server's socket exists before the client's handshake ends; with the
// request ignored and sent again, the two ends' sequence numbers differ.
func TestFastOpen(t *testing.T) {
	for _, name := range []string{"fast-open-taken", "fast-open-ignored"} {
		for _, accelerated := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/%s", name, map[bool]string{false: "plain", true: "sockredir"}[accelerated]), func(t *testing.T) {
				e := harness.New(t)
				if accelerated {
					e.Up(datapath.Config{})
				}
				var r harness.CaseResult
				e.Run(harness.Scenario{Case: &harness.Case{Name: name, Bytes: 1000}}, &r)
				for _, p := range checkIntactNoErrors(&r) {
					t.Error(p)
				}
				if r.Values["fionread"] != 1000 {
					t.Errorf("FIONREAD at the client says %d bytes are waiting, want 1000", r.Values["fionread"])
				}
				if taken := r.Values["syn_data_acked"] == 1; taken != (name == "fast-open-taken") {
					t.Errorf("the server took the request from the SYN: %v; the case is not what it says", taken)
				}
				if !accelerated {
					return
				}
				if c := e.Status().Counters; c.SocketsAdded%2 != 0 {
					t.Errorf("counters %+v: a socket entered the map without its peer", c)
				}
			})
		}
	}
}

// upkeptCases run accelerated with the daemon's upkeep (datapath.Maintainer),
// which users need for them.
var upkeptCases = map[string]bool{"splice-relay": true}

// requireIoUring skips t where this process can't set up an io_uring
// (harness.IoUringAvailable): there is nothing of sockredir's to test.
func requireIoUring(t *testing.T) {
	t.Helper()
	if err := harness.IoUringAvailable(); err != nil {
		t.Skipf("io_uring is unavailable here: %v", err)
	}
}

func TestZeroLoss(t *testing.T) {
	for _, c := range zeroLossCases {
		for _, accelerated := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/%s", c.name, map[bool]string{false: "plain", true: "sockredir"}[accelerated]), func(t *testing.T) {
				if strings.HasPrefix(c.name, "io-uring-") {
					requireIoUring(t)
				}
				e := harness.New(t)
				if accelerated {
					e.Up(datapath.Config{})
					if upkeptCases[c.name] {
						defer runMaintainer(t, e, 0, false)()
					}
				}
				var r harness.CaseResult
				e.Run(harness.Scenario{Case: &harness.Case{Name: c.name, Bytes: c.bytes}}, &r)
				problems := c.check(&r)
				if c.always != nil {
					for _, p := range c.always(&r) {
						t.Error(p)
					}
				}
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
