package main

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// metric is one number a tool reports.
type metric struct {
	Name  string  `json:"name"`
	Value float64 `json:"value"`
	// Lower says that smaller is better (latencies).
	Lower bool `json:"lower_is_better,omitempty"`
}

// tool is an application benchmark people already trust.
type tool struct {
	name    string
	configs []config
	// run runs the tool once under cfg for about d and returns its numbers;
	// an error includes a check that failed (bytes lost, bad replies).
	run func(ctx context.Context, e *env, cfg config, d time.Duration) ([]metric, error)
}

// Ports inside the benchmark's own namespace.
const (
	iperfPort    = 5201
	sockperfPort = 11111
	redisPort    = 6379
	haproxyPort  = 8080
	nginxPort    = 8081
)

var tools = []tool{
	{"iperf3", []config{tcp, sockredir}, runIperf},
	{"sockperf", []config{tcp, sockredir}, runSockperf},
	{"redis", []config{tcp, sockredir, unixSock}, runRedis},
	{"wrk-haproxy-nginx", []config{tcp, sockredir}, runWrk},
}

// iperfBytes is what each iperf3 run sends: a fixed amount, so that the
// receiver's count must equal it (a timed run stops counting at the end
// with bytes still in flight).
const iperfBytes = "4G"

// iperfMinReceived is the share of the bytes sent that iperf3's receiver
// must report: the 1% (43 MB) it may leave uncounted is more than a
// loopback connection buffers (tcp_rmem allows 32 MiB).
const iperfMinReceived = 0.99

// runIperf: one TCP stream of iperfBytes; every byte sent must be received.
func runIperf(ctx context.Context, e *env, cfg config, _ time.Duration) ([]metric, error) {
	server, err := e.start(ctx, cfg, "iperf3", "--server", "--one-off", "--bind", "127.0.0.1", "--port", strconv.Itoa(iperfPort))
	if err != nil {
		return nil, err
	}
	defer server.stop()
	if err := e.waitListening(ctx, server, iperfPort, ""); err != nil {
		return nil, err
	}
	out, err := e.run(ctx, cfg, "iperf3", "--client", "127.0.0.1", "--port", strconv.Itoa(iperfPort),
		"--bytes", iperfBytes, "--json")
	if err != nil {
		return nil, err
	}
	return parseIperf(out)
}

func parseIperf(out string) ([]metric, error) {
	var r struct {
		End struct {
			SumSent struct {
				Bytes int64 `json:"bytes"`
			} `json:"sum_sent"`
			SumReceived struct {
				Bytes         int64   `json:"bytes"`
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return nil, fmt.Errorf("iperf3 printed no JSON report: %v: %s", err, lastLines(out, 3))
	}
	if r.Error != "" {
		return nil, fmt.Errorf("iperf3: %s", r.Error)
	}
	// iperf3's receiver stops counting when the sender says it is done,
	// with what is still in its socket buffers uncounted: its numbers can
	// only bound what arrived. Less than iperfMinReceived is an error.
	sent, received := r.End.SumSent.Bytes, r.End.SumReceived.Bytes
	if sent == 0 || received > sent || float64(received) < iperfMinReceived*float64(sent) {
		return nil, fmt.Errorf("iperf3: bytes received differ from bytes sent: sent %d, received %d", sent, received)
	}
	return []metric{{Name: "Gbit/s", Value: r.End.SumReceived.BitsPerSecond / 1e9}}, nil
}

// runSockperf: ping-pong of 64-byte messages, full round-trip latency, with
// non-blocking sockets and epoll: sockredir leaves blocking clients on TCP,
// and a non-blocking client without epoll (sockperf's default for one
// connection) spins in recvfrom, which on a 2-CPU machine measures the
// scheduler. epoll needs sockperf's feed file.
func runSockperf(ctx context.Context, e *env, cfg config, d time.Duration) ([]metric, error) {
	port := strconv.Itoa(sockperfPort)
	feed := filepath.Join(e.dir, "sockperf.feed")
	if err := os.WriteFile(feed, []byte("T:127.0.0.1:"+port+"\n"), 0o644); err != nil {
		return nil, err
	}
	server, err := e.start(ctx, cfg, "sockperf", "server", "--tcp", "--nonblocked", "-i", "127.0.0.1", "-p", port)
	if err != nil {
		return nil, err
	}
	defer server.stop()
	if err := e.waitListening(ctx, server, sockperfPort, ""); err != nil {
		return nil, err
	}
	out, err := e.run(ctx, cfg, "sockperf", "ping-pong", "--nonblocked", "-f", feed, "-F", "epoll",
		"-t", strconv.Itoa(max(1, int(d.Seconds()))), "-m", "64", "--full-rtt")
	if err != nil {
		return nil, err
	}
	return parseSockperf(out)
}

var (
	sockperfPercentile = regexp.MustCompile(`percentile (50|99)\.000 =\s+([0-9.]+)`)
	sockperfLosses     = regexp.MustCompile(`# dropped messages = (\d+); # duplicated messages = (\d+); # out-of-order messages = (\d+)`)
)

func parseSockperf(out string) ([]metric, error) {
	losses := sockperfLosses.FindStringSubmatch(out)
	if losses == nil {
		return nil, fmt.Errorf("sockperf printed no message counts: %s", lastLines(out, 3))
	}
	if losses[1] != "0" || losses[2] != "0" || losses[3] != "0" {
		return nil, fmt.Errorf("sockperf: %s", losses[0])
	}
	var ms []metric
	for _, m := range sockperfPercentile.FindAllStringSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(m[2], 64)
		ms = append(ms, metric{Name: "p" + m[1] + " RTT us", Value: v, Lower: true})
	}
	if len(ms) != 2 {
		return nil, fmt.Errorf("sockperf printed no p50 and p99: %s", lastLines(out, 3))
	}
	return ms, nil
}

// redisRequests bounds each redis-benchmark test by count.
const redisRequests = 100000

// runRedis: redis-benchmark SET and GET with 50 clients, over TCP or the
// server's unix socket.
func runRedis(ctx context.Context, e *env, cfg config, _ time.Duration) ([]metric, error) {
	sock := filepath.Join(e.dir, "redis.sock")
	os.Remove(sock)
	server, err := e.start(ctx, cfg, "redis-server", "--port", strconv.Itoa(redisPort), "--bind", "127.0.0.1",
		"--unixsocket", sock, "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--daemonize", "no",
		"--dir", e.dir)
	if err != nil {
		return nil, err
	}
	defer server.stop()
	if err := e.waitListening(ctx, server, redisPort, sock); err != nil {
		return nil, err
	}
	target := []string{"-h", "127.0.0.1", "-p", strconv.Itoa(redisPort)}
	if cfg == unixSock {
		target = []string{"-s", sock}
	}
	out, err := e.run(ctx, cfg, append(append([]string{"redis-benchmark"}, target...),
		"-t", "set,get", "-n", strconv.Itoa(redisRequests), "-c", "50", "-d", "64", "--csv")...)
	if err != nil {
		return nil, err
	}
	return parseRedis(out)
}

// parseRedis reads redis-benchmark's CSV: a header, then one row per test.
func parseRedis(out string) ([]metric, error) {
	rows, err := csv.NewReader(strings.NewReader(out)).ReadAll()
	if err != nil || len(rows) < 3 {
		return nil, fmt.Errorf("redis-benchmark printed no results: %s", lastLines(out, 3))
	}
	col := map[string]int{}
	for i, name := range rows[0] {
		col[name] = i
	}
	rps, okRPS := col["rps"]
	p99, okP99 := col["p99_latency_ms"]
	if !okRPS || !okP99 {
		return nil, fmt.Errorf("redis-benchmark's CSV has no rps and p99_latency_ms: %v", rows[0])
	}
	var ms []metric
	for _, row := range rows[1:] {
		v, err1 := strconv.ParseFloat(row[rps], 64)
		lat, err2 := strconv.ParseFloat(row[p99], 64)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("redis-benchmark row %v", row)
		}
		ms = append(ms, metric{Name: row[0] + " requests/s", Value: v}, metric{Name: row[0] + " p99 ms", Value: lat, Lower: true})
	}
	return ms, nil
}

// wrkBodySize is the file nginx serves; every reply's body must be this long.
const wrkBodySize = 4096

// wrkCheck counts the replies that are not 200 with the whole file.
const wrkCheck = `local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0 end
function response(status, headers, body)
  if status ~= 200 or #body ~= %d then bad = bad + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + t:get("bad") end
  io.write(string.format("bad responses: %%d\n", total))
end
`

// runWrk: wrk with 16 connections to haproxy, a sidecar in front of nginx.
func runWrk(ctx context.Context, e *env, cfg config, d time.Duration) ([]metric, error) {
	if err := writeWrkFiles(e.dir); err != nil {
		return nil, err
	}
	nginx, err := e.start(ctx, cfg, "nginx", "-c", filepath.Join(e.dir, "nginx.conf"), "-p", e.dir)
	if err != nil {
		return nil, err
	}
	defer nginx.stop()
	haproxy, err := e.start(ctx, cfg, "haproxy", "-db", "-f", filepath.Join(e.dir, "haproxy.cfg"))
	if err != nil {
		return nil, err
	}
	defer haproxy.stop()
	if err := e.waitListening(ctx, nginx, nginxPort, ""); err != nil {
		return nil, err
	}
	if err := e.waitListening(ctx, haproxy, haproxyPort, ""); err != nil {
		return nil, err
	}
	out, err := e.run(ctx, cfg, "wrk", "-t1", "-c16", "-d", fmt.Sprintf("%ds", max(1, int(d.Seconds()))), "--latency",
		"-s", filepath.Join(e.dir, "check.lua"), fmt.Sprintf("http://127.0.0.1:%d/file", haproxyPort))
	if err != nil {
		return nil, err
	}
	return parseWrk(out)
}

func writeWrkFiles(dir string) error {
	www := filepath.Join(dir, "www")
	if err := os.MkdirAll(www, 0o755); err != nil {
		return err
	}
	files := map[string]string{
		filepath.Join(www, "file"):      strings.Repeat("x", wrkBodySize),
		filepath.Join(dir, "check.lua"): fmt.Sprintf(wrkCheck, wrkBodySize),
		// One process: no master whose workers could outlive it.
		filepath.Join(dir, "nginx.conf"): fmt.Sprintf(`daemon off;
master_process off;
pid %[1]s/nginx.pid;
error_log %[1]s/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path %[1]s;
  server { listen 127.0.0.1:%[2]d; root %[1]s/www; }
}
`, dir, nginxPort),
		filepath.Join(dir, "haproxy.cfg"): fmt.Sprintf(`global
  maxconn 1024
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend sidecar
  bind 127.0.0.1:%d
  default_backend app
backend app
  server nginx 127.0.0.1:%d
`, haproxyPort, nginxPort),
	}
	for path, content := range files {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}

var (
	wrkRequests = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	wrkP99      = regexp.MustCompile(`\s99%\s+([0-9.]+)(us|ms|s)`)
	wrkBad      = regexp.MustCompile(`bad responses: (\d+)`)
	wrkErrors   = regexp.MustCompile(`(Socket errors: .*|Non-2xx or 3xx responses: \d+)`)
)

func parseWrk(out string) ([]metric, error) {
	if m := wrkErrors.FindString(out); m != "" {
		return nil, fmt.Errorf("wrk: %s", m)
	}
	bad := wrkBad.FindStringSubmatch(out)
	if bad == nil {
		return nil, fmt.Errorf("wrk did not report its reply check: %s", lastLines(out, 3))
	}
	if bad[1] != "0" {
		return nil, fmt.Errorf("wrk: %s replies were not 200 with the whole %d-byte file", bad[1], wrkBodySize)
	}
	rps, p99 := wrkRequests.FindStringSubmatch(out), wrkP99.FindStringSubmatch(out)
	if rps == nil || p99 == nil {
		return nil, fmt.Errorf("wrk printed no requests/s or p99: %s", lastLines(out, 3))
	}
	v, _ := strconv.ParseFloat(rps[1], 64)
	lat, _ := strconv.ParseFloat(p99[1], 64)
	lat *= map[string]float64{"us": 1e-3, "ms": 1, "s": 1e3}[p99[2]]
	return []metric{{Name: "requests/s", Value: v}, {Name: "p99 ms", Value: lat, Lower: true}}, nil
}
