package datapath

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/sockredir/sockredir/pkg/policy"
)

// Bits of struct settings.policy and struct tuning_rule.set (bpf/sockredir.h).
const (
	policyIncludePorts       = 1 << 0
	policyIncludeCIDRs       = 1 << 1
	policyAccelerateBlocking = 1 << 2
	policyAccelerateNewPorts = 1 << 3

	policyExclude = 1
	policyInclude = 2

	tuneSynRTO     = 1 << 0
	tuneRwndInit   = 1 << 1
	tuneSndbuf     = 1 << 2
	tuneRcvbuf     = 1 << 3
	tuneCongestion = 1 << 4
	tuneInitCwnd   = 1 << 5
	tuneBaseRTT    = 1 << 6
	tuneNeedsECN   = 1 << 7
)

// writePolicy makes the policy maps hold exactly p (nil: accelerate every
// local connection, tune none) and returns the settings bits that go with it.
// Connections already made keep what they got; new ones get the new policy.
func writePolicy(o *objects, p *policy.Policy) (flags, rules uint32, err error) {
	if p == nil {
		p = &policy.Policy{}
	}
	r := p.Redirect
	if len(r.IncludePorts) > 0 {
		flags |= policyIncludePorts
	}
	if len(r.IncludeCIDRs) > 0 {
		flags |= policyIncludeCIDRs
	}
	if r.AccelerateBlocking {
		flags |= policyAccelerateBlocking
	}
	if r.AccelerateNewPorts {
		flags |= policyAccelerateNewPorts
	}

	ports := map[uint16]uint32{}
	for _, port := range r.IncludePorts {
		ports[port] = policyInclude
	}
	for _, port := range r.ExcludePorts { // exclusion wins
		ports[port] = policyExclude
	}
	cidrs := map[sockopsCidrKey]uint32{}
	for _, c := range r.IncludeCIDRs {
		cidrs[cidrKey(c)] = policyInclude
	}
	for _, c := range r.ExcludeCIDRs {
		cidrs[cidrKey(c)] = policyExclude
	}
	// What can fail is checked before anything is written: a policy that
	// can't be written leaves the one in force whole.
	if len(ports) > policy.MaxPorts || len(cidrs) > policy.MaxCIDRs {
		return 0, 0, fmt.Errorf("the policy names %d ports and %d CIDRs: at most %d and %d fit",
			len(ports), len(cidrs), policy.MaxPorts, policy.MaxCIDRs)
	}
	var hz uint32
	if slices.ContainsFunc(p.Tuning, func(r policy.Rule) bool { return r.SynRTOMs != 0 }) {
		if hz, err = kernelHZ(); err != nil {
			return 0, 0, err
		}
	}
	if err := replaceRules(o.sockops.PolicyPorts, ports); err != nil {
		return 0, 0, fmt.Errorf("writing the port policy: %w", err)
	}
	if err := replaceRules(o.sockops.PolicyCidrs, cidrs); err != nil {
		return 0, 0, fmt.Errorf("writing the address policy: %w", err)
	}
	for i, rule := range p.Tuning {
		if err := o.sockops.TuningRules.Put(uint32(i), tuningRule(rule, hz)); err != nil {
			return 0, 0, fmt.Errorf("writing tuning rule %d: %w", i, err)
		}
	}
	return flags, uint32(len(p.Tuning)), nil
}

func tuningRule(r policy.Rule, hz uint32) *sockopsTuningRule {
	out := &sockopsTuningRule{
		Nports: uint32(len(r.Ports)), Ncidrs: uint32(len(r.CIDRs)),
		RwndInit: r.RwndInit, Sndbuf: r.Sndbuf, Rcvbuf: r.Rcvbuf, InitCwnd: r.InitCwnd, BaseRttUs: r.BaseRTTUs,
		SynRtoJiffies: uint32(math.Ceil(float64(r.SynRTOMs) * float64(hz) / 1000)),
	}
	copy(out.Ports[:], r.Ports)
	for i, c := range r.CIDRs {
		out.Cidrs[i] = cidrKey(c)
	}
	for _, c := range []struct {
		on  bool
		bit uint32
	}{
		{r.SynRTOMs != 0, tuneSynRTO}, {r.RwndInit != 0, tuneRwndInit}, {r.Sndbuf != 0, tuneSndbuf},
		{r.Rcvbuf != 0, tuneRcvbuf}, {r.Congestion != "", tuneCongestion}, {r.InitCwnd != 0, tuneInitCwnd},
		{r.BaseRTTUs != 0, tuneBaseRTT}, {r.NeedsECN, tuneNeedsECN},
	} {
		if c.on {
			out.Set |= c.bit
		}
	}
	for i := range len(r.Congestion) {
		out.Congestion[i] = int8(r.Congestion[i])
	}
	return out
}

// cidrKey is a prefix as the BPF side keys it: IPv4 in IPv4-mapped form.
func cidrKey(p netip.Prefix) sockopsCidrKey {
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	a := p.Masked().Addr().As16()
	var k sockopsCidrKey
	k.Prefixlen = uint32(bits)
	for i := range k.Addr {
		k.Addr[i] = uint32(a[4*i]) | uint32(a[4*i+1])<<8 | uint32(a[4*i+2])<<16 | uint32(a[4*i+3])<<24
	}
	return k
}

// replaceRules makes the policy map m hold exactly want (policyInclude or
// policyExclude by key). New rules go in before stale ones go out, so that
// a rule in both is never missing meanwhile and a new exclusion holds
// before an old one goes. When the two don't fit together, stale
// inclusions make room first, as a connection left on TCP for a moment is
// harmless; stale exclusions only if that is not enough.
func replaceRules[K comparable](m *ebpf.Map, want map[K]uint32) error {
	var (
		key                  K
		value                uint32
		staleIncl, staleExcl []K
	)
	it := m.Iterate()
	for it.Next(&key, &value) {
		if _, keep := want[key]; !keep && value == policyInclude {
			staleIncl = append(staleIncl, key)
		} else if !keep {
			staleExcl = append(staleExcl, key)
		}
	}
	if err := it.Err(); err != nil {
		return err
	}
	room := int(m.MaxEntries()) - len(want)
	if len(staleIncl)+len(staleExcl) > room {
		if err := deleteKeys(m, staleIncl); err != nil {
			return err
		}
		staleIncl = nil
	}
	if len(staleExcl) > room {
		if err := deleteKeys(m, staleExcl); err != nil {
			return err
		}
		staleExcl = nil
	}
	for k, v := range want {
		if err := m.Put(k, v); err != nil {
			return err
		}
	}
	return deleteKeys(m, append(staleIncl, staleExcl...))
}

// deleteStale deletes the entries of m that are not in want.
func deleteStale[K comparable, V any](m *ebpf.Map, want map[K]V) error {
	var (
		key   K
		value V
		stale []K
	)
	it := m.Iterate()
	for it.Next(&key, &value) {
		if _, keep := want[key]; !keep {
			stale = append(stale, key)
		}
	}
	if err := it.Err(); err != nil {
		return err
	}
	return deleteKeys(m, stale)
}

// deleteKeys deletes keys from m; a key gone already is no error.
func deleteKeys[K any](m *ebpf.Map, keys []K) error {
	for _, k := range keys {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}

// kernelHZ measures how many jiffies the kernel counts a second: the SYN
// timeout the sock_ops program answers is in jiffies, and CONFIG_HZ is not
// readable on every host.
func kernelHZ() (uint32, error) {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SocketFilter,
		License:      "GPL",
		Instructions: asm.Instructions{asm.FnJiffies64.Call(), asm.Return()},
	})
	if err != nil {
		return 0, fmt.Errorf("measuring the kernel's HZ: %w", err)
	}
	defer prog.Close()
	jiffies := func() (uint32, time.Time, error) {
		v, err := prog.Run(&ebpf.RunOptions{Data: make([]byte, 14)})
		return v, time.Now(), err
	}
	j0, t0, err := jiffies()
	if err != nil {
		return 0, fmt.Errorf("measuring the kernel's HZ: %w", err)
	}
	time.Sleep(200 * time.Millisecond)
	j1, t1, err := jiffies()
	if err != nil {
		return 0, fmt.Errorf("measuring the kernel's HZ: %w", err)
	}
	measured := float64(j1-j0) / t1.Sub(t0).Seconds()
	best := uint32(0)
	for _, hz := range []uint32{100, 250, 300, 1000} { // the values Kconfig offers
		if best == 0 || math.Abs(float64(hz)-measured) < math.Abs(float64(best)-measured) {
			best = hz
		}
	}
	return best, nil
}
