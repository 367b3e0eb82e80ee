package datapath

import (
	"encoding/binary"
	"testing"
)

// The Go mirrors of the BPF layouts must match the compiled objects.
func TestLayoutsMatchBPF(t *testing.T) {
	spec, err := loadSockops()
	if err != nil {
		t.Fatal(err)
	}
	var c Counters
	if got, want := len(c.counterFields()), int(spec.Maps["counters"].MaxEntries); got != want {
		t.Errorf("Counters has %d fields, the BPF counters map %d entries (enum counter)", got, want)
	}
	if got, want := binary.Size(socketReport{}), binary.Size(sockopsSockKey{})+8; got != want {
		t.Errorf("socketReport is %d bytes, want %d (struct socket_report)", got, want)
	}
}
