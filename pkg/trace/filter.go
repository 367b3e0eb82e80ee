package trace

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"
)

// ParseAddr parses an address filter (Options.Addr): a CIDR prefix, or one
// address.
func ParseAddr(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is neither an address nor a CIDR prefix such as 10.0.0.0/8 or fd00::/64", s)
		}
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR prefix such as 10.0.0.0/8 or fd00::/64", s)
	}
	return p.Masked(), nil
}

// addrFilter is the BPF program's form of a prefix (filter_net and
// filter_mask in bpf/trace.c): four 32-bit words in network byte order, an
// IPv4 prefix as its IPv4-mapped IPv6 form. The zero prefix, which means
// no filter, gives an all-zero mask: it matches every address.
func addrFilter(p netip.Prefix) (network, mask [4]uint32) {
	if !p.IsValid() {
		return network, mask
	}
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	a := p.Masked().Addr().As16()
	var m [16]byte
	for i := range m {
		switch {
		case bits >= 8:
			m[i], bits = 0xff, bits-8
		case bits > 0:
			m[i], bits = ^byte(0xff>>bits), 0
		}
	}
	for i := range 4 {
		network[i] = binary.NativeEndian.Uint32(a[4*i:])
		mask[i] = binary.NativeEndian.Uint32(m[4*i:])
	}
	return network, mask
}
