// Package metrics exports the datapath's counters to Prometheus. The
// collector reads the pinned maps on every scrape, so the numbers are never
// older than the scrape and nothing polls in between.
package metrics

import (
	"errors"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/sockredir/sockredir/pkg/datapath"
)

// Collector is a prometheus.Collector for the datapath pinned in a directory.
type Collector struct {
	pinDir    string
	up        *prometheus.Desc
	sockets   *prometheus.Desc
	capacity  *prometheus.Desc
	probation *prometheus.Desc
	counters  []counterDesc
}

type counterDesc struct {
	desc  *prometheus.Desc
	value func(datapath.Counters) uint64
}

// NewCollector returns a collector for the datapath pinned in pinDir.
func NewCollector(pinDir string) *Collector {
	counter := func(name, help string, value func(datapath.Counters) uint64) counterDesc {
		return counterDesc{prometheus.NewDesc("sockredir_"+name, help, nil, nil), value}
	}
	return &Collector{
		pinDir: pinDir,
		up: prometheus.NewDesc("sockredir_up",
			"1 when the datapath is attached to its cgroup; 0 when it is not up or only draining.", nil, nil),
		sockets: prometheus.NewDesc("sockredir_map_sockets",
			"Sockets in the sockhash now: two per accelerated connection.", nil, nil),
		capacity: prometheus.NewDesc("sockredir_map_capacity_sockets",
			"Sockets the sockhash can hold; connections beyond it use plain TCP.", nil, nil),
		probation: prometheus.NewDesc("sockredir_probation_sockets",
			"Sockets of connections on probation now: on plain TCP, watched until they close.", nil, nil),
		counters: []counterDesc{
			counter("sockets_added_total", "Sockets added to the sockhash, two per accelerated connection.",
				func(c datapath.Counters) uint64 { return c.SocketsAdded }),
			counter("add_failures_total", "Sockets that could not be added to the sockhash (full, or out of memory); their connections use plain TCP.",
				func(c datapath.Counters) uint64 { return c.AddFailures }),
			counter("pairs_declined_total", "Sockets in the sockhash that stayed on TCP from their first message: the peer was not in the map, or bytes had already gone over TCP.",
				func(c datapath.Counters) uint64 { return c.PairsDeclined }),
			counter("blocking_clients_skipped_total", "Connections left on plain TCP because the client socket was blocking (see docs/correctness.md).",
				func(c datapath.Counters) uint64 { return c.BlockingSkipped }),
			counter("policy_skipped_total", "Connections the redirect policy (--config) left on plain TCP.",
				func(c datapath.Counters) uint64 { return c.PolicySkipped }),
			counter("inbound_refused_total", "Sockets that took their bytes over TCP because they read in a way tcp_bpf gets wrong (SO_RCVLOWAT; FIONREAD where it ignores redirected bytes).",
				func(c datapath.Counters) uint64 { return c.InboundRefused }),
			counter("probation_connections_total", "Connections held on plain TCP because their server port was on probation (not yet seen to read in a way tcp_bpf gets right).",
				func(c datapath.Counters) uint64 { return c.ProbationConnections }),
			counter("ports_cleared_total", "Server ports whose probation ended well: their later connections are accelerated.",
				func(c datapath.Counters) uint64 { return c.PortsCleared }),
			counter("redirected_messages_total", "Messages sent straight into the peer socket's receive queue.",
				func(c datapath.Counters) uint64 { return c.MessagesRedirected }),
			counter("redirected_bytes_total", "Bytes sent straight into the peer socket's receive queue.",
				func(c datapath.Counters) uint64 { return c.BytesRedirected }),
			counter("passed_messages_total", "Messages of sockets in the sockhash that went over TCP (peer gone, down under way, pass-only mode).",
				func(c datapath.Counters) uint64 { return c.MessagesPassed }),
			counter("passed_bytes_total", "Bytes of sockets in the sockhash that went over TCP.",
				func(c datapath.Counters) uint64 { return c.BytesPassed }),
		},
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.up
	ch <- c.sockets
	ch <- c.capacity
	ch <- c.probation
	for _, cd := range c.counters {
		ch <- cd.desc
	}
}

// Collect implements prometheus.Collector. With nothing pinned it reports
// only sockredir_up 0; an error reading the maps fails the scrape's
// sockredir metrics, not the others.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	u, err := datapath.ReadUsage(c.pinDir)
	if errors.Is(err, datapath.ErrNotUp) {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 0)
		return
	}
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.up, err)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, boolToFloat(u.Up))
	ch <- prometheus.MustNewConstMetric(c.sockets, prometheus.GaugeValue, float64(u.Sockets))
	ch <- prometheus.MustNewConstMetric(c.capacity, prometheus.GaugeValue, float64(u.MapSize))
	ch <- prometheus.MustNewConstMetric(c.probation, prometheus.GaugeValue, float64(u.ProbationSockets))
	for _, cd := range c.counters {
		ch <- prometheus.MustNewConstMetric(cd.desc, prometheus.CounterValue, float64(cd.value(u.Counters)))
	}
}

func boolToFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Handler serves the registry's metrics; errors of one collector are logged
// and leave the other metrics in the response.
func Handler(reg *prometheus.Registry, log *zap.Logger) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:      zapErrorLog{log},
		ErrorHandling: promhttp.ContinueOnError,
	})
}

type zapErrorLog struct{ log *zap.Logger }

func (l zapErrorLog) Println(v ...any) { l.log.Sugar().Warnln(v...) }

// AddressTracker is what the daemon's local-address tracker tells.
type AddressTracker interface {
	Addresses() int
	Namespaces() int
}

// TrackerGauges export how many local addresses and network namespaces t
// follows.
func TrackerGauges(t AddressTracker) []prometheus.Collector {
	return []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sockredir_local_addresses",
			Help: "Addresses the datapath counts as local: those of the daemon's network namespace and of every namespace a process of the cgroup is in.",
		}, func() float64 { return float64(t.Addresses()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sockredir_network_namespaces",
			Help: "Network namespaces whose addresses the daemon follows.",
		}, func() float64 { return float64(t.Namespaces()) }),
	}
}

// Upkeep counts what the daemon's upkeep of the accelerated sockets does
// (datapath.Maintainer); it lives in the daemon, not in the BPF maps.
type Upkeep struct {
	Checks   prometheus.Counter
	Failures prometheus.Counter
	Released prometheus.Counter
	Aborted  prometheus.Counter
}

// NewUpkeep makes the upkeep's counters.
func NewUpkeep() *Upkeep {
	return &Upkeep{
		Checks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sockredir_upkeep_checks_total",
			Help: "Checks of the accelerated sockets: backlogs, blocking readers, connections back on TCP.",
		}),
		Failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sockredir_upkeep_failures_total",
			Help: "Checks of the accelerated sockets that failed (the daemon logs why).",
		}),
		Released: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sockredir_upkeep_released_sockets_total",
			Help: "Sockets of connections back on TCP taken out of the sockhash: plain TCP sockets again.",
		}),
		Aborted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sockredir_upkeep_aborted_connections_total",
			Help: "Connections aborted because their reader splices(2) and can't read what is redirected to it " +
				"(kernels without the splice guard).",
		}),
	}
}

// Collectors are the counters, to register.
func (u *Upkeep) Collectors() []prometheus.Collector {
	return []prometheus.Collector{u.Checks, u.Failures, u.Released, u.Aborted}
}
