package trace

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// Op is the sock_ops callback that produced an event (BPF_SOCK_OPS_* in
// linux/bpf.h).
type Op uint32

// The callbacks trace reports.
const (
	OpTCPConnect         Op = 3
	OpActiveEstablished  Op = 4
	OpPassiveEstablished Op = 5
	OpRTO                Op = 8
	OpRetransmit         Op = 9
	OpStateChange        Op = 10
	OpTCPListen          Op = 11
	OpRTT                Op = 12
)

// opNames are the kernel's names without the BPF_SOCK_OPS_ prefix.
var opNames = map[Op]string{
	OpTCPConnect:         "TCP_CONNECT_CB",
	OpActiveEstablished:  "ACTIVE_ESTABLISHED_CB",
	OpPassiveEstablished: "PASSIVE_ESTABLISHED_CB",
	OpRTO:                "RTO_CB",
	OpRetransmit:         "RETRANS_CB",
	OpStateChange:        "STATE_CB",
	OpTCPListen:          "TCP_LISTEN_CB",
	OpRTT:                "RTT_CB",
}

func (o Op) String() string {
	if name, ok := opNames[o]; ok {
		return name
	}
	return fmt.Sprintf("OP_%d", uint32(o))
}

func (o Op) MarshalText() ([]byte, error) { return []byte(o.String()), nil }

// State is a TCP state (BPF_TCP_* in linux/bpf.h, the kernel's TCP_*).
type State uint32

var stateNames = []string{1: "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",
	"TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV"}

// TCP states that the tests and callers look for.
const (
	StateEstablished State = 1
	StateSynSent     State = 2
	StateSynRecv     State = 3
	StateClose       State = 7
	StateListen      State = 10
)

func (s State) String() string {
	if int(s) < len(stateNames) && stateNames[s] != "" {
		return stateNames[s]
	}
	return fmt.Sprintf("STATE_%d", uint32(s))
}

func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// Event is one callback of one socket. The fields after BytesReceived are
// set only for the ops their comments name.
type Event struct {
	Time   time.Time
	Op     Op
	Socket uint64 // socket cookie: the same for every event of one socket
	NetNS  uint64 // network namespace cookie (SO_NETNS_COOKIE)
	// Local and Remote are the socket's addresses: IPv4 for AF_INET
	// sockets, IPv6 (maybe IPv4-mapped) for AF_INET6 ones. A listener's
	// remote end is the unspecified address, port 0.
	Local, Remote netip.AddrPort
	State         State  // the socket's state during the callback
	SRTT          uint32 // smoothed RTT, µs (0 until the first sample)
	SndCwnd       uint32 // congestion window, segments
	TotalRetrans  uint32 // segments retransmitted so far
	BytesAcked    uint64 // bytes sent and acknowledged (not those redirected)
	BytesReceived uint64 // bytes received over TCP (not those redirected)

	// STATE_CB: the state left and the state entered.
	OldState, NewState State
	// RETRANS_CB: the first sequence number and the segments retransmitted,
	// and the transmit's error (0: sent).
	RetransSeq, RetransSegs uint32
	RetransErr              int32
	// RTT_CB: the RTT sample that updated SRTT, µs, on kernels that pass
	// it (6.12 does, 6.1 and 6.6 don't: 0).
	RTT uint32
	// RTO_CB: the retransmission timeouts in a row so far, and whether the
	// connection has now given up (it closes with ETIMEDOUT).
	Retransmits uint32
	RTOExpired  bool
}

// clock turns bpf_ktime_get_ns (CLOCK_MONOTONIC) into wall-clock time.
type clock struct {
	offset int64 // CLOCK_REALTIME - CLOCK_MONOTONIC, ns
}

func newClock() (clock, error) {
	var before, mono, after unix.Timespec
	for _, read := range []struct {
		id int32
		ts *unix.Timespec
	}{{unix.CLOCK_REALTIME, &before}, {unix.CLOCK_MONOTONIC, &mono}, {unix.CLOCK_REALTIME, &after}} {
		if err := unix.ClockGettime(read.id, read.ts); err != nil {
			return clock{}, fmt.Errorf("reading the clocks: %w", err)
		}
	}
	// The monotonic reading lies between the two wall-clock ones.
	return clock{offset: before.Nano() + (after.Nano()-before.Nano())/2 - mono.Nano()}, nil
}

func (c clock) wall(ktimeNS uint64) time.Time {
	return time.Unix(0, int64(ktimeNS)+c.offset)
}

// decode turns the BPF program's struct event into an Event.
func decode(raw []byte, c clock) (Event, error) {
	var ev traceEvent
	if _, err := binary.Decode(raw, binary.NativeEndian, &ev); err != nil {
		return Event{}, fmt.Errorf("decoding a trace event of %d bytes: %w", len(raw), err)
	}
	e := Event{
		Time:          c.wall(ev.KtimeNs),
		Op:            Op(ev.Op),
		Socket:        ev.SocketCookie,
		NetNS:         ev.NetnsCookie,
		Local:         netip.AddrPortFrom(addr(ev.Family, ev.LocalIp), uint16(ev.LocalPort)),
		Remote:        netip.AddrPortFrom(addr(ev.Family, ev.RemoteIp), uint16(ev.RemotePort)),
		State:         State(ev.State),
		SRTT:          ev.SrttUs,
		SndCwnd:       ev.SndCwnd,
		TotalRetrans:  ev.TotalRetrans,
		BytesAcked:    ev.BytesAcked,
		BytesReceived: ev.BytesReceived,
	}
	switch e.Op {
	case OpStateChange:
		e.OldState, e.NewState = State(ev.Args[0]), State(ev.Args[1])
	case OpRetransmit:
		e.RetransSeq, e.RetransSegs, e.RetransErr = ev.Args[0], ev.Args[1], int32(ev.Args[2])
	case OpRTO:
		e.Retransmits, e.RTOExpired = ev.Args[0], ev.Args[2] != 0
	case OpRTT:
		// Kernels that pass the sample also pass the new SRTT (scaled by 8);
		// the socket's field still holds the one before the sample.
		if ev.Args[1] != 0 {
			e.RTT, e.SRTT = ev.Args[0], ev.Args[1]>>3
		}
	}
	return e, nil
}

// addr turns an address in network byte order, IPv4 kept IPv4-mapped, into
// the socket's own family.
func addr(family uint32, ip [4]uint32) netip.Addr {
	var b [16]byte
	for i, word := range ip {
		binary.NativeEndian.PutUint32(b[4*i:], word)
	}
	if family == unix.AF_INET {
		return netip.AddrFrom4([4]byte(b[12:]))
	}
	return netip.AddrFrom16(b)
}
