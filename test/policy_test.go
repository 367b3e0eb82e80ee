package test

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/policy"
	"github.com/sockredir/sockredir/test/harness"
)

func mustParse(t *testing.T, config string) *policy.Policy {
	t.Helper()
	p, err := policy.Parse([]byte(config))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// transferOn runs one connection to port and returns the counters it moved.
func transferOn(t *testing.T, e *harness.Env, listen string, seed uint64) datapath.Counters {
	t.Helper()
	before := e.Status().Counters
	tr := harness.Transfer{Listen: listen, Bytes: 1 << 20, Seed: seed}
	var res harness.TransferResult
	e.Run(harness.Scenario{Transfer: &tr}, &res)
	tr.Check(t, &res)
	after := e.Status().Counters
	return datapath.Counters{
		SocketsAdded:    after.SocketsAdded - before.SocketsAdded,
		BytesRedirected: after.BytesRedirected - before.BytesRedirected,
		PolicySkipped:   after.PolicySkipped - before.PolicySkipped,
	}
}

func TestPolicyIncludeExclude(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{Policy: mustParse(t, `
redirect:
  exclude_ports: [7001]
  include_cidrs: [127.0.0.0/8]
`)})
	if c := transferOn(t, e, "127.0.0.1:7001", 1); c.SocketsAdded != 0 || c.PolicySkipped != 1 {
		t.Errorf("an excluded port was accelerated: %+v", c)
	}
	if c := transferOn(t, e, "127.0.0.1:7002", 2); c.SocketsAdded != 2 || c.BytesRedirected == 0 {
		t.Errorf("an included connection was not accelerated: %+v", c)
	}
	if c := transferOn(t, e, "[::1]:7003", 3); c.SocketsAdded != 0 || c.PolicySkipped != 1 {
		t.Errorf("a peer outside include_cidrs was accelerated: %+v", c)
	}
}

// A new policy applies in place: a connection streaming across the change
// carries on untouched, and new connections follow the new policy.
func TestPolicyReloadInPlace(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	tr := harness.Transfer{Listen: "127.0.0.1:7010", Bytes: 4 << 20, Seed: 4, ReadPause: 10 * time.Millisecond}
	agent := e.Start(harness.Scenario{Transfer: &tr}, time.Minute)
	time.Sleep(200 * time.Millisecond)
	if res := e.Up(datapath.Config{Policy: mustParse(t, "redirect:\n  exclude_ports: [7011]\n")}); res != datapath.AlreadyUp {
		t.Fatalf("up with a new policy: %s", res)
	}
	var res harness.TransferResult
	if err := agent.Wait(&res); err != nil {
		t.Fatal(err)
	}
	tr.Check(t, &res)
	if c := e.Status().Counters; c.BytesRedirected != uint64(2*tr.Bytes) || c.BytesPassed != 0 {
		t.Errorf("the stream across the reload: %d bytes redirected, %d passed; want all %d redirected",
			c.BytesRedirected, c.BytesPassed, 2*tr.Bytes)
	}
	if c := transferOn(t, e, "127.0.0.1:7011", 5); c.SocketsAdded != 0 || c.PolicySkipped != 1 {
		t.Errorf("the new policy's excluded port: %+v, want it skipped by the policy", c)
	}
	if c := transferOn(t, e, "127.0.0.1:7012", 7); c.SocketsAdded != 2 || c.BytesRedirected == 0 {
		t.Errorf("another port after the reload: %+v, want it accelerated", c)
	}
}

// A reload to a policy as large as the maps hold, with none of the old
// entries in it, applies whole; one that can't fit fails and leaves the
// policy in force as it was.
func TestPolicyReloadFillsTheMaps(t *testing.T) {
	e := harness.New(t)
	excluding := func(first uint16) *policy.Policy {
		p := &policy.Policy{}
		for port := range uint16(policy.MaxPorts) {
			p.Redirect.ExcludePorts = append(p.Redirect.ExcludePorts, first+port)
		}
		return p
	}
	e.Up(datapath.Config{Policy: excluding(20000)})
	if res := e.Up(datapath.Config{Policy: excluding(30000)}); res != datapath.AlreadyUp {
		t.Fatalf("up with a new policy: %s", res)
	}
	if c := transferOn(t, e, "127.0.0.1:30007", 1); c.SocketsAdded != 0 || c.PolicySkipped != 1 {
		t.Errorf("a port the new policy excludes: %+v, want it skipped by the policy", c)
	}
	if c := transferOn(t, e, "127.0.0.1:20007", 2); c.SocketsAdded != 2 || c.BytesRedirected == 0 {
		t.Errorf("a port only the old policy excluded: %+v, want it accelerated", c)
	}

	tooMany := excluding(40000)
	tooMany.Redirect.ExcludePorts = append(tooMany.Redirect.ExcludePorts, 50000)
	tooMany.Redirect.AccelerateNewPorts = true
	var err error
	e.Do(func() error {
		_, err = datapath.Up(datapath.Config{Cgroup: e.Cgroup, PinDir: e.PinDir, Policy: tooMany})
		return nil
	})
	if err == nil || !strings.Contains(err.Error(), "at most 1024") {
		t.Errorf("up with %d excluded ports: %v, want an error saying at most 1024 fit", policy.MaxPorts+1, err)
	}
	if c := transferOn(t, e, "127.0.0.1:30008", 3); c.SocketsAdded != 0 || c.PolicySkipped != 1 {
		t.Errorf("after the failed reload, a port the policy in force excludes: %+v, want it still skipped", c)
	}
	if c := transferOn(t, e, "127.0.0.1:40008", 4); c.SocketsAdded != 2 {
		t.Errorf("after the failed reload, a port only the failed policy excluded: %+v, want it accelerated", c)
	}
}

// accelerate_blocking opts blocking clients in (iperf3, simple clients);
// without it they stay on TCP.
func TestPolicyAccelerateBlocking(t *testing.T) {
	for _, tc := range []struct {
		name        string
		policy      string
		accelerated bool
	}{
		{"default", "", false},
		{"accelerate_blocking", "redirect:\n  accelerate_blocking: true\n", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := harness.New(t)
			cfg := datapath.Config{}
			if tc.policy != "" {
				cfg.Policy = mustParse(t, tc.policy)
			}
			e.Up(cfg)
			r := runCase(t, e, harness.Case{Name: "blocking-client-sends", Bytes: 1 << 20})
			if got := r.Received["server"]; !got.Intact() {
				t.Errorf("the server read %d of %d bytes, intact %v", got.Bytes, got.WantSize, got.Intact())
			}
			c := e.Status().Counters
			if accelerated := c.BlockingSkipped == 0 && c.BytesRedirected == 1<<20; accelerated != tc.accelerated {
				t.Errorf("blocking client accelerated: %v, want %v; counters %+v", accelerated, tc.accelerated, c)
			}
			if !tc.accelerated && c.BlockingSkipped != 1 {
				t.Errorf("blocking clients skipped: %d, want 1", c.BlockingSkipped)
			}
		})
	}
}

// bufferTuning is a tuning rule for port 7100 that every kernel applies.
const bufferTuning = `
tuning:
  - ports: [7100]
    rcvbuf: 100000
    sndbuf: 150000
    congestion: reno
    init_cwnd: 23
`

// A tuning rule's settings are what both ends' sockets report.
func TestTuningApplied(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{Policy: mustParse(t, bufferTuning)})
	r := runCase(t, e, harness.Case{Name: "tcp-tuning", Target: "127.0.0.1:7100"})
	for _, side := range []string{"client", "server"} {
		// The kernel doubles SO_RCVBUF and SO_SNDBUF for its own
		// bookkeeping; no data has been sent, so the congestion window
		// is where init_cwnd put it.
		got := []int64{r.Values[side+"_rcvbuf"], r.Values[side+"_sndbuf"], r.Values[side+"_snd_cwnd"]}
		if want := []int64{200000, 300000, 23}; !slices.Equal(got, want) || r.Texts[side+"_congestion"] != "reno" {
			t.Errorf("%s: rcvbuf, sndbuf, cwnd %v and congestion %q; want %v and reno", side, got, r.Texts[side+"_congestion"], want)
		}
	}
}

// ss shows what a tuning rule set, as it would to a user.
func TestTuningVisibleInSS(t *testing.T) {
	requireApps(t, "ss")
	e := harness.New(t)
	e.Up(datapath.Config{Policy: mustParse(t, bufferTuning)})
	tr := harness.Transfer{Listen: "127.0.0.1:7100", Bytes: 1 << 20, Seed: 6, HoldOpen: time.Second}
	agent := e.Start(harness.Scenario{Transfer: &tr}, time.Minute)
	time.Sleep(300 * time.Millisecond)
	out := run(t, e, nil, "ss", "-tmin", "state", "established", "( sport = :7100 or dport = :7100 )")
	var res harness.TransferResult
	if err := agent.Wait(&res); err != nil {
		t.Fatal(err)
	}
	tr.Check(t, &res)
	// The kernel doubles SO_RCVBUF and SO_SNDBUF for its own bookkeeping.
	// The redirected connection sends no TCP data, so its congestion window
	// stays where init_cwnd put it.
	for _, want := range []string{"rb200000", "tb300000", "reno", "cwnd:23"} {
		if n := strings.Count(out, want); n != 2 {
			t.Errorf("%q on %d of the 2 sockets, want both:\n%s", want, n, out)
		}
	}
}

// needs_ecn makes both ends negotiate ECN, as TCP_INFO shows (ss on some
// hosts prints no TCP options at all).
func TestTuningNeedsECN(t *testing.T) {
	e := harness.New(t)
	options := func() (client, server int64) {
		var r harness.CaseResult
		e.Run(harness.Scenario{Case: &harness.Case{Name: "tcp-tuning", Target: "127.0.0.1:7200"}}, &r)
		return r.Values["client_options"], r.Values["server_options"]
	}
	const ecn = 8 // TCPI_OPT_ECN
	e.Up(datapath.Config{})
	if c, s := options(); c&ecn != 0 || s&ecn != 0 {
		t.Fatalf("ECN negotiated without the rule (options %#x, %#x): the check can't tell", c, s)
	}
	e.Up(datapath.Config{Policy: mustParse(t, "tuning:\n  - ports: [7200]\n    needs_ecn: true\n")})
	if c, s := options(); c&ecn == 0 || s&ecn == 0 {
		t.Errorf("needs_ecn: TCP options %#x (client) and %#x (server), want ECN on both", c, s)
	}
}

// syn_rto_ms shortens the time a connection to a silent peer takes to give up.
func TestTuningSynRTO(t *testing.T) {
	e := harness.New(t)
	silentPeer(t, e)
	e.Do(func() error { // one SYN retry: give-up after 1 s + 2 s by default
		return os.WriteFile("/proc/sys/net/ipv4/tcp_syn_retries", []byte("1"), 0o644)
	})
	connect := func() int64 {
		var r harness.CaseResult
		e.Run(harness.Scenario{Case: &harness.Case{Name: "connect-time", Target: "10.79.0.9:80"}}, &r)
		if r.Errors["connect"] == "" {
			t.Fatal("connected to a silent peer")
		}
		return r.Values["connect_ms"]
	}
	e.Up(datapath.Config{})
	plain := connect()
	e.Up(datapath.Config{Policy: mustParse(t, "tuning:\n  - cidrs: [10.79.0.0/24]\n    syn_rto_ms: 200\n")})
	tuned := connect()
	t.Logf("connect gave up after %d ms by default, %d ms with syn_rto_ms 200", plain, tuned)
	if tuned*3 > plain {
		t.Errorf("syn_rto_ms 200: gave up after %d ms, default %d ms; want less than a third", tuned, plain)
	}
}

// silentPeer routes 10.79.0.9 into a veth whose other end drops everything:
// SYNs leave and nothing answers.
func silentPeer(t *testing.T, e *harness.Env) {
	e.Do(func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "silent0"}, PeerName: "silent1"}
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		if err := setAddrUp(veth, "10.79.0.1/24"); err != nil {
			return err
		}
		peer, err := netlink.LinkByName("silent1")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(peer); err != nil {
			return err
		}
		// A neighbour entry, so the SYNs go out instead of waiting on ARP.
		return netlink.NeighAdd(&netlink.Neigh{
			LinkIndex: veth.Attrs().Index, State: netlink.NUD_PERMANENT,
			IP: []byte{10, 79, 0, 9}, HardwareAddr: peer.Attrs().HardwareAddr,
		})
	})
}

// A bad config names the key and line, and nothing is attached.
func TestCLIBadConfig(t *testing.T) {
	e := harness.New(t)
	config := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(config, []byte("redirect:\n  exclude_ports: [22]\ntuning:\n  - ports: [7100]\n    rcvbuff: 1\n"), 0o644)
	r := runCLI(t, nil, "up", "--cgroup", e.Cgroup, "--pin-dir", e.PinDir, "--config", config)
	if r.code != 1 || !regexp.MustCompile(`line 5: field rcvbuff not found`).MatchString(r.stderr) {
		t.Errorf("exit %d, stderr %q: want exit 1 naming line 5 and rcvbuff", r.code, r.stderr)
	}
	if _, err := os.Stat(e.PinDir); err == nil {
		t.Error("pins left behind by a rejected config")
	}
	if ids := e.AttachedSockOps(); len(ids) != 0 {
		t.Errorf("attached despite a bad config: %v", ids)
	}
}
