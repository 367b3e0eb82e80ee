package datapath

import (
	"encoding/binary"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/sockredir/sockredir/pkg/policy"
)

// The Go mirrors of the BPF layouts must match the compiled objects.
func TestLayoutsMatchBPF(t *testing.T) {
	spec, err := loadSockops()
	if err != nil {
		t.Fatal(err)
	}
	var c Counters
	header, err := os.ReadFile("../../bpf/sockredir.h")
	if err != nil {
		t.Fatal(err)
	}
	// enum counter isn't in the objects' BTF: count its entries in the source.
	enum := regexp.MustCompile(`(?s)enum counter \{(.*?)COUNTER_MAX,`).FindSubmatch(header)
	if enum == nil {
		t.Fatal("enum counter not found in bpf/sockredir.h")
	}
	if got, want := len(c.counterFields()), strings.Count(string(enum[1]), "COUNTER_"); got != want {
		t.Errorf("Counters has %d fields, enum counter %d entries", got, want)
	}
	if got, slots := len(c.counterFields()), int(spec.Maps["counters"].MaxEntries); got > slots {
		t.Errorf("Counters has %d fields, the BPF counters map only %d entries", got, slots)
	}
	for name, limit := range map[string]int{"policy_ports": policy.MaxPorts, "policy_cidrs": policy.MaxCIDRs,
		"tuning_rules": policy.MaxTuningRules} {
		if entries := int(spec.Maps[name].MaxEntries); entries != limit {
			t.Errorf("map %s holds %d entries, package policy allows %d", name, entries, limit)
		}
	}
	if got, want := binary.Size(socketReport{}), binary.Size(sockopsSockKey{})+16; got != want {
		t.Errorf("socketReport is %d bytes, want %d (struct socket_report)", got, want)
	}
}
