// Package policy reads sockredir's configuration file: which connections to
// accelerate, and how to tune connections as they are made (the sock_ops
// hook's other use: answering TIMEOUT_INIT and RWND_INIT, and setting socket
// options with bpf_setsockopt).
package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"
)

// Limits of the BPF side (bpf/sockredir.h, and the policy maps of
// bpf/sockops.c).
const (
	MaxPorts          = 1024 // include_ports and exclude_ports together
	MaxCIDRs          = 1024 // include_cidrs and exclude_cidrs together
	MaxTuningRules    = 16
	MaxRulePorts      = 8
	MaxRuleCIDRs      = 4
	MaxCongestionName = 15
)

// Policy is a whole configuration file.
type Policy struct {
	Redirect Redirect `yaml:"redirect"`
	Tuning   []Rule   `yaml:"tuning"`
}

// Redirect says which connections are accelerated. A connection matches a
// port when its local or its remote port is that port, and a CIDR when its
// peer's address is inside it.
type Redirect struct {
	ExcludePorts []uint16       `yaml:"exclude_ports"`
	IncludePorts []uint16       `yaml:"include_ports"` // empty: every port
	ExcludeCIDRs []netip.Prefix `yaml:"exclude_cidrs"`
	IncludeCIDRs []netip.Prefix `yaml:"include_cidrs"` // empty: every peer
	// AccelerateBlocking accelerates clients with blocking sockets too,
	// accepting that a blocking recv(2) on them can fail with EAGAIN when
	// it wakes without data (docs/correctness.md).
	AccelerateBlocking bool `yaml:"accelerate_blocking"`
	// AccelerateNewPorts accelerates a server port's connections from the
	// first one, without the probation that first watches how the port's
	// sockets read (docs/correctness.md). For services known to read with
	// recv(2) from non-blocking sockets.
	AccelerateNewPorts bool `yaml:"accelerate_new_ports"`
}

// Rule tunes the connections it matches: one of Ports (local or remote; none
// means any) and one of CIDRs (the peer; none means any). The first
// matching rule applies. Zero values leave a setting alone.
type Rule struct {
	Ports      []uint16       `yaml:"ports"`
	CIDRs      []netip.Prefix `yaml:"cidrs"`
	SynRTOMs   uint32         `yaml:"syn_rto_ms"` // SYN retransmission timeout (TIMEOUT_INIT)
	RwndInit   uint32         `yaml:"rwnd_init"`  // initial receive window, in segments (RWND_INIT)
	Sndbuf     uint32         `yaml:"sndbuf"`     // SO_SNDBUF, bytes
	Rcvbuf     uint32         `yaml:"rcvbuf"`     // SO_RCVBUF, bytes
	Congestion string         `yaml:"congestion"` // TCP_CONGESTION, e.g. cubic
	InitCwnd   uint32         `yaml:"init_cwnd"`  // initial congestion window, segments (TCP_BPF_IW)
	BaseRTTUs  uint32         `yaml:"base_rtt_us"`
	NeedsECN   bool           `yaml:"needs_ecn"`
}

// Load reads and checks a configuration file.
func Load(path string) (*Policy, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	p, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return p, nil
}

// Parse decodes a configuration strictly: an unknown key, a value of the
// wrong type or an impossible value is an error naming the key and line.
func Parse(data []byte) (*Policy, error) {
	var p Policy
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&p); err != nil && !errors.Is(err, io.EOF) {
		var typeErr *yaml.TypeError
		if errors.As(err, &typeErr) { // one line per mistake: make it one line
			return nil, errors.New(strings.Join(typeErr.Errors, "; "))
		}
		return nil, err
	}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, err
	}
	if err := p.validate(&root); err != nil {
		return nil, err
	}
	return &p, nil
}

func (p *Policy) validate(root *yaml.Node) error {
	at := func(path ...any) int { return line(root, path...) }
	r := p.Redirect
	ports := map[uint16]bool{}
	for _, port := range slices.Concat(r.IncludePorts, r.ExcludePorts) {
		ports[port] = true
	}
	if len(ports) > MaxPorts {
		return fmt.Errorf("line %d: redirect: %d ports in include_ports and exclude_ports, at most %d", at("redirect"), len(ports), MaxPorts)
	}
	cidrs := map[netip.Prefix]bool{}
	for _, c := range slices.Concat(r.IncludeCIDRs, r.ExcludeCIDRs) {
		cidrs[c.Masked()] = true
	}
	if len(cidrs) > MaxCIDRs {
		return fmt.Errorf("line %d: redirect: %d CIDRs in include_cidrs and exclude_cidrs, at most %d", at("redirect"), len(cidrs), MaxCIDRs)
	}
	if len(p.Tuning) > MaxTuningRules {
		return fmt.Errorf("line %d: tuning: at most %d rules", at("tuning"), MaxTuningRules)
	}
	for i, r := range p.Tuning {
		field := func(key string) error {
			return fmt.Errorf("line %d: tuning[%d].%s", at("tuning", i, key), i, key)
		}
		switch {
		case len(r.Ports) > MaxRulePorts:
			return fmt.Errorf("%w: at most %d ports", field("ports"), MaxRulePorts)
		case len(r.CIDRs) > MaxRuleCIDRs:
			return fmt.Errorf("%w: at most %d CIDRs", field("cidrs"), MaxRuleCIDRs)
		case r.SynRTOMs > 120_000:
			return fmt.Errorf("%w: %d ms is longer than TCP's maximum RTO of 120 s", field("syn_rto_ms"), r.SynRTOMs)
		case r.Sndbuf > 1<<30 || r.Rcvbuf > 1<<30:
			return fmt.Errorf("%w: at most 1 GiB", field(map[bool]string{true: "sndbuf", false: "rcvbuf"}[r.Sndbuf > 1<<30]))
		case len(r.Congestion) > MaxCongestionName:
			return fmt.Errorf("%w: %q is longer than a congestion control name can be", field("congestion"), r.Congestion)
		case r.InitCwnd > 1024:
			return fmt.Errorf("%w: %d segments is more than TCP allows", field("init_cwnd"), r.InitCwnd)
		}
		if !r.SetsAnything() {
			return fmt.Errorf("line %d: tuning[%d] sets nothing", at("tuning", i), i)
		}
	}
	for _, ports := range []struct {
		key  string
		list []uint16
	}{{"exclude_ports", p.Redirect.ExcludePorts}, {"include_ports", p.Redirect.IncludePorts}} {
		for i, port := range ports.list {
			if port == 0 {
				return fmt.Errorf("line %d: redirect.%s: port 0", at("redirect", ports.key, i), ports.key)
			}
		}
	}
	return nil
}

// line finds the line of the node at path (map keys and sequence indexes)
// below root, or of the closest ancestor that exists.
func line(root *yaml.Node, path ...any) int {
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	for _, step := range path {
		next := (*yaml.Node)(nil)
		switch s := step.(type) {
		case string:
			for i := 0; n.Kind == yaml.MappingNode && i+1 < len(n.Content); i += 2 {
				if n.Content[i].Value == s {
					next = n.Content[i+1]
				}
			}
		case int:
			if n.Kind == yaml.SequenceNode && s < len(n.Content) {
				next = n.Content[s]
			}
		}
		if next == nil {
			break
		}
		n = next
	}
	return n.Line
}

// SetsAnything reports whether the rule changes any setting.
func (r Rule) SetsAnything() bool {
	return r.SynRTOMs != 0 || r.RwndInit != 0 || r.Sndbuf != 0 || r.Rcvbuf != 0 || r.Congestion != "" ||
		r.InitCwnd != 0 || r.BaseRTTUs != 0 || r.NeedsECN
}
