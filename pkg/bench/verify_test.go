package bench

import (
	"errors"
	"strings"
	"testing"

	"github.com/sockredir/sockredir/pkg/datapath"
)

func TestVerifyBytes(t *testing.T) {
	rr := Workload{Kind: RequestResponse, Size: 64, Conns: 1}
	stream := Workload{Kind: Stream, Method: Write, Size: 1 << 10, Conns: 1}
	crr := Workload{Kind: ConnectRequestClose, Size: 64, Conns: 1}
	whole := func() (*workerReport, *workerReport) {
		return &workerReport{Connections: 1, BytesSent: 640, BytesReceived: 640, Ops: 8},
			&workerReport{Connections: 1, BytesSent: 640, BytesReceived: 640}
	}
	for _, c := range []struct {
		name     string
		w        Workload
		change   func(client, server *workerReport)
		wantErr  string
		wantLost bool
	}{
		{name: "every byte arrived", w: rr, change: func(c, s *workerReport) {}},
		{name: "the server missed request bytes", w: rr, change: func(c, s *workerReport) { s.BytesReceived -= 1 },
			wantErr: "the client sent 640 bytes, the server received 639", wantLost: true},
		{name: "the client missed reply bytes", w: rr, change: func(c, s *workerReport) { c.BytesReceived -= 64 },
			wantErr: "the server sent 640 bytes, the client received 576", wantLost: true},
		{name: "the receiver got more than was sent", w: rr, change: func(c, s *workerReport) { s.BytesReceived += 64 },
			wantErr: "the client sent 640 bytes, the server received 704", wantLost: true},
		{name: "a request was not answered", w: crr, change: func(c, s *workerReport) { s.BytesSent -= 64; c.BytesReceived -= 64 },
			wantErr: "are not whole 64-byte exchanges", wantLost: true},
		{name: "connections differ", w: rr, change: func(c, s *workerReport) { s.Connections = 2 },
			wantErr: "the client completed 1 connections, the server 2"},
		{name: "nothing measured", w: rr, change: func(c, s *workerReport) { c.Ops = 0 },
			wantErr: "no operation finished inside the measured window"},
		{name: "nothing sent", w: rr, change: func(c, s *workerReport) { *c, *s = workerReport{Ops: 1}, workerReport{} },
			wantErr: "no bytes were sent"},
		{name: "stream arrived whole", w: stream, change: func(c, s *workerReport) {
			c.BytesReceived, s.BytesSent = 0, 0
			s.WindowBytes, s.WindowNanos = 100, 10
		}},
		{name: "stream lost its tail", w: stream, change: func(c, s *workerReport) {
			c.BytesReceived, s.BytesSent = 0, 0
			s.BytesReceived -= 10
			s.WindowBytes, s.WindowNanos = 100, 10
		}, wantErr: "the client sent 640 bytes, the server received 630", wantLost: true},
		{name: "stream with no window", w: stream, change: func(c, s *workerReport) { c.BytesReceived, s.BytesSent = 0, 0 },
			wantErr: "the receiver read nothing after the warm-up"},
	} {
		t.Run(c.name, func(t *testing.T) {
			client, server := whole()
			c.change(client, server)
			err := verifyBytes(c.w, client, server)
			if c.wantErr == "" {
				if err != nil {
					t.Fatalf("want no error, got %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Fatalf("want an error containing %q, got %v", c.wantErr, err)
			}
			if errors.Is(err, ErrLostBytes) != c.wantLost {
				t.Errorf("errors.Is(err, ErrLostBytes) = %v, want %v (%v)", !c.wantLost, c.wantLost, err)
			}
		})
	}
}

func TestVerifyPath(t *testing.T) {
	before := datapath.Counters{BytesRedirected: 1000, BytesPassed: 500}
	after := func(redirected, passed uint64) datapath.Counters {
		return datapath.Counters{BytesRedirected: 1000 + redirected, BytesPassed: 500 + passed}
	}
	for _, c := range []struct {
		name    string
		cfg     Config
		after   datapath.Counters
		wantErr bool
	}{
		{"sockredir redirected everything", Sockredir, after(300, 0), false},
		{"sockredir left bytes on TCP", Sockredir, after(200, 100), true},
		{"sockredir accelerated nothing", Sockredir, after(0, 300), true},
		{"hooks alone passed everything", HookOnly, after(0, 300), false},
		{"hooks alone: a message the kernel passed without the program", HookOnly, after(0, 280), false},
		{"hooks alone redirected", HookOnly, after(10, 290), true},
		{"hooks alone never ran", HookOnly, after(0, 0), true},
		{"tcp has no datapath", TCP, datapath.Counters{}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := verifyPath(c.cfg, before, c.after, 300)
			if (err != nil) != c.wantErr {
				t.Errorf("verifyPath = %v, want error %v", err, c.wantErr)
			}
		})
	}
}
