package policy

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"
)

func TestParseExample(t *testing.T) {
	p, err := Parse([]byte(`
redirect:
  exclude_ports: [22]
  include_cidrs: [127.0.0.0/8, "::1/128"]
  accelerate_blocking: true
  accelerate_new_ports: true
tuning:
  - ports: [7100]
    rcvbuf: 4194304
    sndbuf: 4194304
    syn_rto_ms: 200
  - cidrs: [10.0.0.0/8]
    congestion: cubic
    init_cwnd: 20
    needs_ecn: true
`))
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Redirect.ExcludePorts) != 1 || p.Redirect.ExcludePorts[0] != 22 || !p.Redirect.AccelerateBlocking ||
		!p.Redirect.AccelerateNewPorts {
		t.Errorf("redirect: %+v", p.Redirect)
	}
	if p.Redirect.IncludeCIDRs[1] != netip.MustParsePrefix("::1/128") {
		t.Errorf("include_cidrs: %v", p.Redirect.IncludeCIDRs)
	}
	if len(p.Tuning) != 2 || p.Tuning[0].SynRTOMs != 200 || p.Tuning[1].Congestion != "cubic" || !p.Tuning[1].NeedsECN {
		t.Errorf("tuning: %+v", p.Tuning)
	}
}

func TestParseEmpty(t *testing.T) {
	if _, err := Parse(nil); err != nil {
		t.Fatalf("an empty config: %v", err)
	}
}

// Every mistake names its key and line.
func TestParseErrors(t *testing.T) {
	for _, c := range []struct {
		config string
		want   string
	}{
		{"redirect:\n  exclude_port: [22]\n", "line 2: field exclude_port not found"},
		{"redirect:\n  exclude_ports: [ssh]\n", "line 2: cannot unmarshal !!str `ssh` into uint16"},
		{"redirect:\n  exclude_ports: [70000]\n", "line 2: cannot unmarshal !!int `70000` into uint16"},
		{"redirect:\n  include_cidrs: [10.0.0.0/33]\n", "netip.ParsePrefix(\"10.0.0.0/33\")"},
		{"tuning:\n  - ports: [1]\n    syn_rto_ms: 999999\n", "line 3: tuning[0].syn_rto_ms: 999999 ms is longer"},
		{"tuning:\n  - ports: [1]\n    congestion: a-very-long-algorithm-name\n", "line 3: tuning[0].congestion"},
		{"tuning:\n  - ports: [7100]\n", "line 2: tuning[0] sets nothing"},
		{"tuning:\n  - ports: [1]\n    rcvbuf: -1\n", "line 3: cannot unmarshal !!int `-1` into uint32"},
		{"redirect:\n  exclude_ports: [0]\n", "line 2: redirect.exclude_ports: port 0"},
		{"redirect:\n  include_ports: [" + portList(1, 600) + "]\n  exclude_ports: [" + portList(601, 1025) + "]\n",
			"line 2: redirect: 1025 ports in include_ports and exclude_ports, at most 1024"},
		{"redirect:\n  exclude_cidrs: [" + cidrList(1025) + "]\n",
			"line 2: redirect: 1025 CIDRs in include_cidrs and exclude_cidrs, at most 1024"},
	} {
		_, err := Parse([]byte(c.config))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: got %v, want an error containing %q", c.config, err, c.want)
		}
	}
}

// portList is "from, from+1, ..., to" for a YAML flow sequence.
func portList(from, to int) string {
	ports := make([]string, 0, to-from+1)
	for p := from; p <= to; p++ {
		ports = append(ports, strconv.Itoa(p))
	}
	return strings.Join(ports, ", ")
}

// cidrList is n different /24s for a YAML flow sequence.
func cidrList(n int) string {
	cidrs := make([]string, n)
	for i := range cidrs {
		cidrs[i] = fmt.Sprintf("10.%d.%d.0/24", i/256, i%256)
	}
	return strings.Join(cidrs, ", ")
}

// The limits count what the maps hold: a port or prefix named twice is
// one entry.
func TestParseCountsDistinctEntries(t *testing.T) {
	config := "redirect:\n  include_ports: [" + portList(1, 1000) + "]\n  exclude_ports: [" + portList(1, 1000) + "]\n" +
		"  include_cidrs: [" + cidrList(1000) + ", 10.0.0.1/24]\n  exclude_cidrs: [" + cidrList(1000) + "]\n"
	if _, err := Parse([]byte(config)); err != nil {
		t.Errorf("1000 ports and 1000 prefixes, each named twice: %v", err)
	}
}
