package main

import (
	"strings"
	"testing"
)

func TestParseIperf(t *testing.T) {
	ms, err := parseIperf(`{"end":{"sum_sent":{"bytes":4096},"sum_received":{"bytes":4090,"bits_per_second":2.5e10}}}`)
	if err != nil || len(ms) != 1 || ms[0].Value != 25 {
		t.Errorf("whole transfer: %v, %v", ms, err)
	}
	_, err = parseIperf(`{"end":{"sum_sent":{"bytes":4096},"sum_received":{"bytes":4000,"bits_per_second":1e9}}}`)
	if err == nil || !strings.Contains(err.Error(), "bytes received differ from bytes sent") {
		t.Errorf("lost bytes must be an error, got %v", err)
	}
	if _, err := parseIperf(`{"error":"unable to connect"}`); err == nil {
		t.Error("an iperf3 error must be an error")
	}
}

func TestParseSockperf(t *testing.T) {
	out := `sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0
sockperf: ---> percentile 99.000 =   31.895
sockperf: ---> percentile 50.000 =    9.933
`
	ms, err := parseSockperf(out)
	if err != nil || len(ms) != 2 || ms[1].Name != "p50 RTT us" || ms[1].Value != 9.933 || !ms[1].Lower {
		t.Errorf("got %+v, %v", ms, err)
	}
	if _, err := parseSockperf(strings.Replace(out, "dropped messages = 0", "dropped messages = 3", 1)); err == nil {
		t.Error("dropped messages must be an error")
	}
}

func TestParseRedis(t *testing.T) {
	out := `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"SET","43572.98","0.600","0.160","0.559","0.927","1.295","3.031"
"GET","44267.38","0.590","0.152","0.551","0.903","1.183","2.367"
`
	ms, err := parseRedis(out)
	if err != nil || len(ms) != 4 || ms[2].Name != "GET requests/s" || ms[2].Value != 44267.38 || ms[3].Value != 1.183 {
		t.Errorf("got %+v, %v", ms, err)
	}
	if _, err := parseRedis("ERR: connection refused\n"); err == nil {
		t.Error("no CSV must be an error")
	}
}

func TestParseWrk(t *testing.T) {
	out := `  Latency Distribution
     50%  480.00us
     99%    1.52ms
  290000 requests in 10.00s, 1.20GB read
Requests/sec:  29320.50
Transfer/sec:    122.90MB
bad responses: 0
`
	ms, err := parseWrk(out)
	if err != nil || len(ms) != 2 || ms[0].Value != 29320.50 || ms[1].Value != 1.52 {
		t.Errorf("got %+v, %v", ms, err)
	}
	for _, bad := range []string{
		strings.Replace(out, "bad responses: 0", "bad responses: 2", 1),
		strings.Replace(out, "Requests/sec", "Socket errors: connect 0, read 3, write 0, timeout 0\nRequests/sec", 1),
		strings.Replace(out, "bad responses: 0\n", "", 1),
	} {
		if _, err := parseWrk(bad); err == nil {
			t.Errorf("want an error for:\n%s", bad)
		}
	}
}
