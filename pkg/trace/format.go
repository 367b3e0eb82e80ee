package trace

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// String is the event as one readable line (without the newline): time, op,
// socket cookie, network namespace cookie, both ends, and what the op says.
func (e Event) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %-22s sock %d netns %d %s > %s", e.Time.Format("15:04:05.000000"), e.Op,
		e.Socket, e.NetNS, e.Local, e.Remote)
	switch e.Op {
	case OpStateChange:
		fmt.Fprintf(&b, " %s > %s", e.OldState, e.NewState)
		if e.NewState == StateClose {
			fmt.Fprintf(&b, " (TCP bytes: %d acked, %d received)", e.BytesAcked, e.BytesReceived)
		}
	case OpRTT:
		fmt.Fprintf(&b, " srtt %s", micros(e.SRTT))
		if e.RTT != 0 {
			fmt.Fprintf(&b, " sample %s", micros(e.RTT))
		}
		fmt.Fprintf(&b, " cwnd %d", e.SndCwnd)
	case OpActiveEstablished, OpPassiveEstablished:
		fmt.Fprintf(&b, " srtt %s cwnd %d", micros(e.SRTT), e.SndCwnd)
	case OpRetransmit:
		fmt.Fprintf(&b, " seq %d segs %d total_retrans %d", e.RetransSeq, e.RetransSegs, e.TotalRetrans)
		if e.RetransErr != 0 {
			fmt.Fprintf(&b, " err %d", e.RetransErr)
		}
	case OpRTO:
		fmt.Fprintf(&b, " %s retransmits %d srtt %s", e.State, e.Retransmits, micros(e.SRTT))
		if e.RTOExpired {
			b.WriteString(" expired: giving up")
		}
	}
	return b.String()
}

func micros(us uint32) time.Duration { return time.Duration(us) * time.Microsecond }

// jsonEvent is an event's JSON object. The op-specific fields are pointers so
// that they appear exactly for their op, zero or not.
type jsonEvent struct {
	Time          time.Time  `json:"time"`
	Op            Op         `json:"op"`
	Socket        uint64     `json:"socket"`
	NetNS         uint64     `json:"netns"`
	Family        string     `json:"family"`
	LocalAddr     netip.Addr `json:"local_addr"`
	LocalPort     uint16     `json:"local_port"`
	RemoteAddr    netip.Addr `json:"remote_addr"`
	RemotePort    uint16     `json:"remote_port"`
	State         State      `json:"state"`
	SRTT          uint32     `json:"srtt_us"`
	SndCwnd       uint32     `json:"snd_cwnd"`
	TotalRetrans  uint32     `json:"total_retrans"`
	BytesAcked    uint64     `json:"bytes_acked"`
	BytesReceived uint64     `json:"bytes_received"`
	OldState      *State     `json:"old_state,omitempty"`
	NewState      *State     `json:"new_state,omitempty"`
	RTT           *uint32    `json:"rtt_us,omitempty"`
	RetransSeq    *uint32    `json:"retrans_seq,omitempty"`
	RetransSegs   *uint32    `json:"retrans_segs,omitempty"`
	RetransErr    *int32     `json:"retrans_err,omitempty"`
	Retransmits   *uint32    `json:"retransmits,omitempty"`
	RTOExpired    *bool      `json:"rto_expired,omitempty"`
}

// MarshalJSON writes the event as one flat object, e.g. for jq.
func (e Event) MarshalJSON() ([]byte, error) {
	j := jsonEvent{
		Time:          e.Time,
		Op:            e.Op,
		Socket:        e.Socket,
		NetNS:         e.NetNS,
		Family:        "ipv6",
		LocalAddr:     e.Local.Addr(),
		LocalPort:     e.Local.Port(),
		RemoteAddr:    e.Remote.Addr(),
		RemotePort:    e.Remote.Port(),
		State:         e.State,
		SRTT:          e.SRTT,
		SndCwnd:       e.SndCwnd,
		TotalRetrans:  e.TotalRetrans,
		BytesAcked:    e.BytesAcked,
		BytesReceived: e.BytesReceived,
	}
	if e.Local.Addr().Is4() {
		j.Family = "ipv4"
	}
	switch e.Op {
	case OpStateChange:
		j.OldState, j.NewState = &e.OldState, &e.NewState
	case OpRetransmit:
		j.RetransSeq, j.RetransSegs, j.RetransErr = &e.RetransSeq, &e.RetransSegs, &e.RetransErr
	case OpRTO:
		j.Retransmits, j.RTOExpired = &e.Retransmits, &e.RTOExpired
	case OpRTT:
		if e.RTT != 0 {
			j.RTT = &e.RTT
		}
	}
	return json.Marshal(j)
}
