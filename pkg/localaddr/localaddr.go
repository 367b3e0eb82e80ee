// Package localaddr lists the IP addresses of this host, which tell the
// datapath that the other end of a connection is local.
package localaddr

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// List returns the addresses of every interface in the current network
// namespace, IPv4 and IPv6, without duplicates.
func List() ([]netip.Addr, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("listing local addresses: %w", err)
	}
	seen := make(map[netip.Addr]bool, len(addrs))
	var out []netip.Addr
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if !seen[ip] {
			seen[ip] = true
			out = append(out, ip)
		}
	}
	return out, nil
}
