package localaddr

import (
	"net/netip"
	"slices"
	"testing"
)

func TestListHasLoopback(t *testing.T) {
	addrs, err := List()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(addrs, netip.MustParseAddr("127.0.0.1")) {
		t.Fatalf("127.0.0.1 missing from %v", addrs)
	}
	for _, a := range addrs {
		if a.Is4In6() {
			t.Errorf("%v is IPv4-mapped: List must return plain IPv4", a)
		}
	}
}
