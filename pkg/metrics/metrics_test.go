package metrics

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// With nothing pinned, only sockredir_up is reported, as 0.
func TestCollectorNotUp(t *testing.T) {
	c := NewCollector(t.TempDir() + "/nothing-pinned")
	want := `
# HELP sockredir_up 1 when the datapath is attached to its cgroup; 0 when it is not up or only draining.
# TYPE sockredir_up gauge
sockredir_up 0
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
}

// Every metric is named sockredir_* and has help text; the registry
// accepts the collector (no duplicate or inconsistent descriptions).
func TestMetricNames(t *testing.T) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector("/nonexistent"))
	reg.MustRegister(TrackerGauges(fakeTracker{})...)
	reg.MustRegister(NewUpkeep().Collectors()...)
	descs := make(chan *prometheus.Desc, 100)
	NewCollector("/nonexistent").Describe(descs)
	close(descs)
	n := 0
	for d := range descs {
		n++
		if s := d.String(); !strings.Contains(s, `fqName: "sockredir_`) || strings.Contains(s, `help: ""`) {
			t.Errorf("badly named or undocumented: %s", s)
		}
	}
	if n != 16 {
		t.Errorf("%d metrics described, want 16", n)
	}
}

type fakeTracker struct{}

func (fakeTracker) Addresses() int  { return 3 }
func (fakeTracker) Namespaces() int { return 1 }
