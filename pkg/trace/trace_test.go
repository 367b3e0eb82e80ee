package trace

import (
	"encoding/binary"
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"
)

// words is an address in the BPF program's form: network byte order, IPv4
// as IPv4-mapped IPv6.
func words(a string) [4]uint32 {
	b := netip.MustParseAddr(a).As16()
	var w [4]uint32
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w
}

// encode is what the BPF program sends for ev.
func encode(t *testing.T, ev traceEvent) []byte {
	t.Helper()
	raw, err := binary.Append(nil, binary.NativeEndian, ev)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func TestDecode(t *testing.T) {
	c := clock{offset: 1_700_000_000_000_000_000}
	for _, tc := range []struct {
		name string
		raw  traceEvent
		want Event
	}{
		{
			name: "ipv4 state change",
			raw: traceEvent{KtimeNs: 5_000, SocketCookie: 42, NetnsCookie: 7, LocalIp: words("127.0.0.1"),
				RemoteIp: words("127.0.0.2"), Op: 10, Family: unix.AF_INET, LocalPort: 40000, RemotePort: 7000,
				Args: [3]uint32{2, 1}, State: 2, SrttUs: 50, SndCwnd: 10},
			want: Event{Time: time.Unix(0, 1_700_000_000_000_005_000), Op: OpStateChange, Socket: 42, NetNS: 7,
				Local: netip.MustParseAddrPort("127.0.0.1:40000"), Remote: netip.MustParseAddrPort("127.0.0.2:7000"),
				State: StateSynSent, SRTT: 50, SndCwnd: 10, OldState: StateSynSent, NewState: StateEstablished},
		},
		{
			name: "ipv6 retransmit",
			raw: traceEvent{Op: 9, Family: unix.AF_INET6, LocalIp: words("fd00::1"), RemoteIp: words("::ffff:10.0.0.1"),
				LocalPort: 1, RemotePort: 2, Args: [3]uint32{123456, 2, 0xfffffff5}, State: 1, TotalRetrans: 3},
			want: Event{Time: time.Unix(0, c.offset), Op: OpRetransmit, Local: netip.MustParseAddrPort("[fd00::1]:1"),
				Remote: netip.MustParseAddrPort("[::ffff:10.0.0.1]:2"), State: StateEstablished, TotalRetrans: 3,
				RetransSeq: 123456, RetransSegs: 2, RetransErr: -11},
		},
		{
			name: "rto",
			raw:  traceEvent{Op: 8, Family: unix.AF_INET, Args: [3]uint32{4, 200, 1}},
			want: Event{Time: time.Unix(0, c.offset), Op: OpRTO, Local: netip.MustParseAddrPort("0.0.0.0:0"),
				Remote: netip.MustParseAddrPort("0.0.0.0:0"), Retransmits: 4, RTOExpired: true},
		},
		{
			name: "rtt with the sample (6.12 and later)",
			raw:  traceEvent{Op: 12, Family: unix.AF_INET, SrttUs: 40, Args: [3]uint32{30, 38 << 3}},
			want: Event{Time: time.Unix(0, c.offset), Op: OpRTT, Local: netip.MustParseAddrPort("0.0.0.0:0"),
				Remote: netip.MustParseAddrPort("0.0.0.0:0"), SRTT: 38, RTT: 30},
		},
		{
			name: "rtt without the sample",
			raw:  traceEvent{Op: 12, Family: unix.AF_INET, SrttUs: 40},
			want: Event{Time: time.Unix(0, c.offset), Op: OpRTT, Local: netip.MustParseAddrPort("0.0.0.0:0"),
				Remote: netip.MustParseAddrPort("0.0.0.0:0"), SRTT: 40},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := decode(encode(t, tc.raw), c)
			if err != nil {
				t.Fatal(err)
			}
			if !got.Time.Equal(tc.want.Time) {
				t.Errorf("time %v, want %v", got.Time, tc.want.Time)
			}
			got.Time = tc.want.Time
			if got != tc.want {
				t.Errorf("decoded\n%+v\nwant\n%+v", got, tc.want)
			}
		})
	}
	if _, err := decode(make([]byte, 8), c); err == nil {
		t.Error("a short record decoded without error")
	}
}

func TestClockIsWallTime(t *testing.T) {
	c, err := newClock()
	if err != nil {
		t.Fatal(err)
	}
	var mono unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &mono); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(c.wall(uint64(mono.Nano()))); d.Abs() > 100*time.Millisecond {
		t.Errorf("the monotonic time of now converts to %v ago", d)
	}
}

func TestNames(t *testing.T) {
	for op, want := range map[Op]string{OpTCPConnect: "TCP_CONNECT_CB", OpActiveEstablished: "ACTIVE_ESTABLISHED_CB",
		OpPassiveEstablished: "PASSIVE_ESTABLISHED_CB", OpTCPListen: "TCP_LISTEN_CB", OpStateChange: "STATE_CB",
		OpRetransmit: "RETRANS_CB", OpRTO: "RTO_CB", OpRTT: "RTT_CB", 99: "OP_99"} {
		if got := op.String(); got != want {
			t.Errorf("op %d is %q, want %q", uint32(op), got, want)
		}
	}
	for state, want := range map[State]string{1: "ESTABLISHED", 4: "FIN_WAIT1", 7: "CLOSE", 9: "LAST_ACK",
		11: "CLOSING", 12: "NEW_SYN_RECV", 0: "STATE_0", 13: "STATE_13"} {
		if got := state.String(); got != want {
			t.Errorf("state %d is %q, want %q", uint32(state), got, want)
		}
	}
}

func TestString(t *testing.T) {
	base := Event{Time: time.Date(2026, 1, 2, 15, 4, 5, 123456789, time.Local), Socket: 8193, NetNS: 4,
		Local: netip.MustParseAddrPort("127.0.0.1:41234"), Remote: netip.MustParseAddrPort("127.0.0.1:7000"),
		State: StateEstablished, SRTT: 52, SndCwnd: 10, TotalRetrans: 2}
	prefix := func(op string) string {
		return "15:04:05.123456 " + op + strings.Repeat(" ", 22-len(op)) + " sock 8193 netns 4 127.0.0.1:41234 > 127.0.0.1:7000"
	}
	for _, tc := range []struct {
		edit func(*Event)
		want string
	}{
		{func(e *Event) { e.Op = OpTCPConnect }, prefix("TCP_CONNECT_CB")},
		{func(e *Event) { e.Op = OpActiveEstablished }, prefix("ACTIVE_ESTABLISHED_CB") + " srtt 52µs cwnd 10"},
		{func(e *Event) { e.Op, e.OldState, e.NewState = OpStateChange, StateEstablished, 4 },
			prefix("STATE_CB") + " ESTABLISHED > FIN_WAIT1"},
		{func(e *Event) {
			e.Op, e.OldState, e.NewState, e.BytesAcked, e.BytesReceived = OpStateChange, 5, StateClose, 3, 1
		},
			prefix("STATE_CB") + " FIN_WAIT2 > CLOSE (TCP bytes: 3 acked, 1 received)"},
		{func(e *Event) { e.Op = OpRTT }, prefix("RTT_CB") + " srtt 52µs cwnd 10"},
		{func(e *Event) { e.Op, e.RTT = OpRTT, 1500 }, prefix("RTT_CB") + " srtt 52µs sample 1.5ms cwnd 10"},
		{func(e *Event) { e.Op, e.RetransSeq, e.RetransSegs = OpRetransmit, 99, 1 },
			prefix("RETRANS_CB") + " seq 99 segs 1 total_retrans 2"},
		{func(e *Event) { e.Op, e.RetransSeq, e.RetransSegs, e.RetransErr = OpRetransmit, 99, 1, -11 },
			prefix("RETRANS_CB") + " seq 99 segs 1 total_retrans 2 err -11"},
		{func(e *Event) { e.Op, e.Retransmits = OpRTO, 1 }, prefix("RTO_CB") + " ESTABLISHED retransmits 1 srtt 52µs"},
		{func(e *Event) { e.Op, e.Retransmits, e.RTOExpired = OpRTO, 6, true },
			prefix("RTO_CB") + " ESTABLISHED retransmits 6 srtt 52µs expired: giving up"},
	} {
		e := base
		tc.edit(&e)
		if got := e.String(); got != tc.want {
			t.Errorf("%s:\n got %q\nwant %q", e.Op, got, tc.want)
		}
	}
}

func TestMarshalJSON(t *testing.T) {
	base := Event{Time: time.Date(2026, 1, 2, 15, 4, 5, 0, time.UTC), Socket: 1, NetNS: 2,
		Local: netip.MustParseAddrPort("[::1]:7000"), Remote: netip.MustParseAddrPort("[::1]:40000"), State: StateEstablished}
	common := []string{"time", "op", "socket", "netns", "family", "local_addr", "local_port", "remote_addr", "remote_port",
		"state", "srtt_us", "snd_cwnd", "total_retrans", "bytes_acked", "bytes_received"}
	for _, tc := range []struct {
		op    Op
		edit  func(*Event)
		extra map[string]any
	}{
		{OpPassiveEstablished, nil, nil},
		{OpStateChange, func(e *Event) { e.OldState, e.NewState = StateSynRecv, StateEstablished },
			map[string]any{"old_state": "SYN_RECV", "new_state": "ESTABLISHED"}},
		{OpRetransmit, nil, map[string]any{"retrans_seq": 0.0, "retrans_segs": 0.0, "retrans_err": 0.0}},
		{OpRTO, func(e *Event) { e.Retransmits = 2 }, map[string]any{"retransmits": 2.0, "rto_expired": false}},
		{OpRTT, nil, nil},
		{OpRTT, func(e *Event) { e.RTT = 12 }, map[string]any{"rtt_us": 12.0}},
	} {
		e := base
		e.Op = tc.op
		if tc.edit != nil {
			tc.edit(&e)
		}
		line, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		var got map[string]any
		if err := json.Unmarshal(line, &got); err != nil {
			t.Fatal(err)
		}
		if got["op"] != tc.op.String() || got["family"] != "ipv6" || got["local_addr"] != "::1" ||
			got["local_port"] != 7000.0 || got["state"] != "ESTABLISHED" || got["time"] != "2026-01-02T15:04:05Z" {
			t.Errorf("%s: %s", tc.op, line)
		}
		if len(got) != len(common)+len(tc.extra) {
			t.Errorf("%s: want exactly the fields %v and %v: %s", tc.op, common, tc.extra, line)
		}
		for k, v := range tc.extra {
			if got[k] != v {
				t.Errorf("%s: %s is %v, want %v: %s", tc.op, k, got[k], v, line)
			}
		}
	}
}

func TestParseAddr(t *testing.T) {
	for in, want := range map[string]string{
		"10.0.0.0/8":          "10.0.0.0/8",
		"10.1.2.3/8":          "10.0.0.0/8",
		"127.0.0.1":           "127.0.0.1/32",
		"::1":                 "::1/128",
		"fd00::1/64":          "fd00::/64",
		"::ffff:10.0.0.0/104": "::ffff:10.0.0.0/104",
	} {
		got, err := ParseAddr(in)
		if err != nil || got.String() != want {
			t.Errorf("ParseAddr(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "10.0.0.0/33", "example.com", "10.0.0/8"} {
		if _, err := ParseAddr(bad); err == nil {
			t.Errorf("ParseAddr(%q) succeeded", bad)
		}
	}
}

// matches is what bpf/trace.c's addr_matches does with one address.
func matches(network, mask, ip [4]uint32) bool {
	for i := range ip {
		if ip[i]&mask[i] != network[i] {
			return false
		}
	}
	return true
}

func TestAddrFilter(t *testing.T) {
	for _, tc := range []struct {
		prefix string // empty: no filter
		in     []string
		out    []string
	}{
		{"", []string{"127.0.0.1", "::1", "10.1.2.3", "fd00::1"}, nil},
		{"10.0.0.0/8", []string{"10.0.0.0", "10.255.255.255", "::ffff:10.1.2.3"}, []string{"11.0.0.1", "9.255.255.255", "::a01:203"}},
		{"127.0.0.1/32", []string{"127.0.0.1"}, []string{"127.0.0.2", "::1"}},
		{"10.77.0.0/23", []string{"10.77.1.255"}, []string{"10.77.2.0"}},
		{"fd00::/64", []string{"fd00::1", "fd00::ffff:ffff:ffff:ffff"}, []string{"fd00:0:0:1::", "fe80::1"}},
		{"::1/128", []string{"::1"}, []string{"::2", "127.0.0.1"}},
	} {
		var p netip.Prefix
		if tc.prefix != "" {
			p = netip.MustParsePrefix(tc.prefix)
		}
		network, mask := addrFilter(p)
		for _, a := range tc.in {
			if !matches(network, mask, words(a)) {
				t.Errorf("%s does not match %s", a, tc.prefix)
			}
		}
		for _, a := range tc.out {
			if matches(network, mask, words(a)) {
				t.Errorf("%s matches %s", a, tc.prefix)
			}
		}
	}
}

// The Go side must agree with the compiled object: its event layout and the
// filter variables the loader sets.
func TestObjectMatchesGo(t *testing.T) {
	spec, err := loadTrace()
	if err != nil {
		t.Fatal(err)
	}
	size, err := btf.Sizeof(spec.Maps[traceMapEvents].Value)
	if err != nil {
		t.Fatal(err)
	}
	if want := binary.Size(traceEvent{}); size != want {
		t.Errorf("struct event is %d bytes, the Go type %d", size, want)
	}
	for name, want := range map[string]uint32{traceVarFilterPort: 2, traceVarFilterNet: 16, traceVarFilterMask: 16} {
		v := spec.Variables[name]
		if v == nil || v.Size() != want || !v.Constant() {
			t.Errorf("variable %s: %v, want a %d-byte constant", name, v, want)
		}
	}
}
