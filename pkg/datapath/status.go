package datapath

import (
	"encoding/binary"
	"fmt"
	"io"
	"net/netip"
	"text/tabwriter"

	"github.com/cilium/ebpf"

	"github.com/sockredir/sockredir/pkg/hostfs"
)

// Status is what is attached and what it has done.
type Status struct {
	Up              bool   `json:"up"`
	PinDir          string `json:"pin_dir"`
	Cgroup          string `json:"cgroup,omitempty"`
	RedirectEnabled bool   `json:"redirect_enabled"`
	// SpliceGuard says whether splice reads of accelerated sockets
	// (splice(2), sendfile(2), io_uring's splice) are turned into EINVAL;
	// without it a splice reader loses redirected bytes.
	SpliceGuard bool `json:"splice_guard"`
	// SpliceWatch says whether, without the guard, a socket that starts to
	// splice puts its server port's next connections on TCP. Its own
	// connection loses what is redirected to it; the upkeep (daemon, run)
	// aborts it.
	SpliceWatch bool `json:"splice_watch"`
	// FIONREADGuard says whether a socket that asks FIONREAD takes its
	// bytes over TCP from then on: attached where FIONREAD ignores
	// redirected bytes.
	FIONREADGuard bool `json:"fionread_guard"`
	// RefusingPorts are server ports whose sockets read in a way that
	// tcp_bpf gets wrong, so their connections get no redirected bytes.
	RefusingPorts []RefusingPort `json:"refusing_ports,omitempty"`
	// ClearedPorts are server ports whose probation ended well: their
	// connections are accelerated. Any other port's are on probation.
	ClearedPorts []ServerPort `json:"cleared_ports,omitempty"`
	// ProbationSockets are the sockets of probation connections open now:
	// on TCP, watched until they close.
	ProbationSockets int `json:"probation_sockets"`
	// Kernel is what this kernel does with sockets in a sockhash.
	Kernel        KernelRules `json:"kernel"`
	MapSize       uint32      `json:"map_size,omitempty"`
	Sockets       int         `json:"sockets"`
	UnreadSockets int         `json:"sockets_with_unread_data"`
	Programs      []Program   `json:"programs,omitempty"`
	Counters      Counters    `json:"counters"`
}

// ServerPort is a server's address and port, in the network namespace with
// cookie NetNS (0 for all but loopback).
type ServerPort struct {
	NetNS   uint64     `json:"netns,omitempty"`
	Address netip.Addr `json:"address"`
	Port    uint32     `json:"port"`
}

func (p ServerPort) String() string {
	return netip.AddrPortFrom(p.Address, uint16(p.Port)).String()
}

// addrOf turns an address as the BPF side keys it (network byte order, IPv4
// IPv4-mapped) back into its own family.
func addrOf(words [4]uint32) netip.Addr {
	var b [16]byte
	for i, w := range words {
		binary.NativeEndian.PutUint32(b[4*i:], w)
	}
	return netip.AddrFrom16(b).Unmap()
}

func serverPort(k sockopsPortKey) ServerPort {
	return ServerPort{NetNS: k.Netns, Address: addrOf(k.Addr), Port: k.Port}
}

// RefusingPort is a server port whose sockets take their bytes over TCP
// only, and why.
type RefusingPort struct {
	ServerPort
	Reason string `json:"reason"`
}

// refusalReasons names enum refusal of bpf/sockredir.h.
var refusalReasons = map[uint32]string{1: "SO_RCVLOWAT", 2: "FIONREAD", 3: "backlog", 4: "blocking reads", 5: "splice",
	6: "probation watch lost"}

// Program is one pinned BPF program.
type Program struct {
	Name string `json:"name"`
	ID   uint32 `json:"id"`
	Tag  string `json:"tag"`
}

// Counters are the datapath's totals since `up`, summed over CPUs.
type Counters struct {
	SocketsAdded       uint64 `json:"sockets_added"`
	AddFailures        uint64 `json:"add_failures"`
	MessagesRedirected uint64 `json:"messages_redirected"`
	BytesRedirected    uint64 `json:"bytes_redirected"`
	MessagesPassed     uint64 `json:"messages_passed"`
	BytesPassed        uint64 `json:"bytes_passed"`
	PairsDeclined      uint64 `json:"pairs_declined"`
	BlockingSkipped    uint64 `json:"blocking_skipped"`
	PolicySkipped      uint64 `json:"policy_skipped"`
	// InboundRefused counts sockets that took their bytes over TCP
	// because of how they read (SO_RCVLOWAT, FIONREAD where it can't count
	// redirected bytes).
	InboundRefused uint64 `json:"inbound_refused"`
	// ProbationConnections counts connections held on TCP while their
	// server port was on probation; PortsCleared, the ports whose
	// probation ended well.
	ProbationConnections uint64 `json:"probation_connections"`
	PortsCleared         uint64 `json:"ports_cleared"`
}

// counterFields lists Counters' fields in the order of enum counter in
// bpf/sockredir.h.
func (c *Counters) counterFields() []*uint64 {
	return []*uint64{&c.SocketsAdded, &c.AddFailures, &c.MessagesRedirected, &c.BytesRedirected,
		&c.MessagesPassed, &c.BytesPassed, &c.PairsDeclined, &c.BlockingSkipped, &c.PolicySkipped,
		&c.InboundRefused, &c.ProbationConnections, &c.PortsCleared}
}

// ReadStatus reports on the datapath pinned in pinDir (DefaultPinDir if empty).
func ReadStatus(pinDir string) (Status, error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	st := Status{PinDir: pinDir}
	if err := preflight(); err != nil {
		return st, err
	}
	rules, err := ProbeKernel()
	if err != nil {
		return st, fmt.Errorf("probing the kernel: %w", err)
	}
	st.Kernel = rules
	if err := hostfs.EnsureBPFFS(pinDir); err != nil {
		return st, err
	}
	p := pins(pinDir)
	meta, err := p.meta()
	if err != nil || meta == nil {
		return st, err
	}
	if err := meta.checkABI(pinDir); err != nil {
		return st, err
	}
	st.Up = p.has(pinLink)
	st.SpliceGuard = p.has(pinGuardLink)
	st.SpliceWatch = p.has(pinSpliceWatchLink)
	st.FIONREADGuard = p.has(pinFIONREADLink)
	st.Cgroup = meta.cgroup()
	st.MapSize = meta.MapSize

	maps, err := p.loadMaps()
	if err != nil {
		return st, err
	}
	defer closeMaps(maps)
	if m := maps["settings"]; m != nil {
		var s sockopsSettings
		if err := m.Lookup(uint32(0), &s); err != nil {
			return st, fmt.Errorf("reading settings: %w", err)
		}
		st.RedirectEnabled = s.RedirectEnabled != 0
	}
	if m := maps["counters"]; m != nil {
		if st.Counters, err = readCounters(m); err != nil {
			return st, err
		}
	}
	if m := maps["refusing_ports"]; m != nil {
		var key sockopsPortKey
		var why uint32
		for it := m.Iterate(); it.Next(&key, &why); {
			st.RefusingPorts = append(st.RefusingPorts, RefusingPort{serverPort(key), refusalReasons[why]})
		}
	}
	if m := maps["cleared_ports"]; m != nil {
		var key sockopsPortKey
		var cleared uint8
		for it := m.Iterate(); it.Next(&key, &cleared); {
			st.ClearedPorts = append(st.ClearedPorts, serverPort(key))
		}
	}
	if st.ProbationSockets, err = countProbationSockets(maps); err != nil {
		return st, err
	}
	if st.Sockets, st.UnreadSockets, err = countSockets(maps, st.Cgroup); err != nil {
		return st, err
	}
	for _, name := range []string{pinSockopsProg, pinRedirectProg, pinSockoptProg} {
		prog, err := p.loadProgram(name)
		if err != nil || prog == nil {
			continue
		}
		info, err := prog.Info()
		prog.Close()
		if err != nil {
			continue
		}
		id, _ := info.ID()
		st.Programs = append(st.Programs, Program{Name: info.Name, ID: uint32(id), Tag: info.Tag})
	}
	return st, nil
}

// countSockets counts the sockets in sock_hash, and those of them that may
// hold redirected bytes not read yet (see inspectSockets).
func countSockets(maps map[string]*ebpf.Map, cgroup string) (sockets, unread int, err error) {
	sockHash := maps["sock_hash"]
	if sockHash == nil {
		return 0, 0, nil
	}
	reports, err := inspectSockets(maps, cgroup)
	if err != nil {
		return 0, 0, err
	}
	var key sockopsSockKey
	var cookie uint64
	for it := sockHash.Iterate(); it.Next(&key, &cookie); {
		sockets++
		if r, seen := reports[key]; !seen || r.Unread != 0 {
			unread++
		}
	}
	return sockets, unread, nil
}

func readCounters(m *ebpf.Map) (Counters, error) {
	var c Counters
	for i, field := range c.counterFields() {
		var perCPU []uint64
		if err := m.Lookup(uint32(i), &perCPU); err != nil {
			return c, fmt.Errorf("reading counter %d: %w", i, err)
		}
		for _, v := range perCPU {
			*field += v
		}
	}
	return c, nil
}

func (s Status) spliceProtection() string {
	switch {
	case s.SpliceGuard:
		return "on"
	case s.SpliceWatch:
		return "unavailable on this kernel; the splice watch keeps a server port on TCP once one of its sockets splices: " +
			"harmless during the port's probation, but an accelerated connection that starts to splice loses what is " +
			"redirected to it (the daemon aborts it)"
	}
	return "unavailable on this kernel: splice(2) readers of accelerated sockets lose data"
}

// WriteText prints the status for people.
func (s Status) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fionread := "counts redirected and TCP bytes"
	switch {
	case !s.Kernel.FIONREADCountsRedirected && s.FIONREADGuard:
		fionread = "ignores redirected bytes on this kernel: a socket that asks gets its bytes over TCP from then on, and so do later connections to its server port"
	case !s.Kernel.FIONREADCountsRedirected:
		fionread = "ignores redirected bytes on this kernel: applications that size reads with it may stall"
	case !s.Kernel.FIONREADCountsTCP:
		fionread = "ignores TCP bytes of sockets in the map on this kernel (sockredir inserts only paired sockets, and the daemon releases connections that go back to TCP)"
	}
	if !s.Up && s.Cgroup == "" {
		fmt.Fprintf(tw, "sockredir is not up (pin directory %s)\nFIONREAD:\t%s\n", s.PinDir, fionread)
		return tw.Flush()
	}
	state := "up"
	switch {
	case !s.Up:
		state = "detached from the cgroup, sockets still draining (run `sockredir down` again)"
	case !s.RedirectEnabled:
		state = "up, redirecting switched off"
	}
	c := s.Counters
	for _, row := range [][2]string{
		{"state", state},
		{"cgroup", s.Cgroup},
		{"pin directory", s.PinDir},
		{"FIONREAD", fionread},
		{"splice guard", s.spliceProtection()},
		{"sockets in map", fmt.Sprintf("%d of %d (%d may hold unread redirected data)", s.Sockets, s.MapSize, s.UnreadSockets)},
		{"sockets added", fmt.Sprint(c.SocketsAdded)},
		{"add failures", fmt.Sprint(c.AddFailures)},
		{"pairs declined", fmt.Sprint(c.PairsDeclined)},
		{"blocking clients left on TCP", fmt.Sprint(c.BlockingSkipped)},
		{"left on TCP by the policy", fmt.Sprint(c.PolicySkipped)},
		{"refused redirected bytes", fmt.Sprintf("%d sockets (SO_RCVLOWAT, FIONREAD, a backlog, blocking reads: back on TCP; "+
			"splice: its server port on TCP)", c.InboundRefused)},
		{"probation", fmt.Sprintf("%d connections held on TCP while their server port was new (%d sockets watched now); %d ports cleared",
			c.ProbationConnections, s.ProbationSockets, c.PortsCleared)},
		{"redirected", fmt.Sprintf("%d messages, %d bytes", c.MessagesRedirected, c.BytesRedirected)},
		{"passed to TCP", fmt.Sprintf("%d messages, %d bytes", c.MessagesPassed, c.BytesPassed)},
	} {
		fmt.Fprintf(tw, "%s:\t%s\n", row[0], row[1])
	}
	for _, r := range s.RefusingPorts {
		fmt.Fprintf(tw, "port on TCP only:\t%s (%s seen)\n", r.ServerPort, r.Reason)
	}
	for _, p := range s.Programs {
		fmt.Fprintf(tw, "program:\t%s (id %d, tag %s)\n", p.Name, p.ID, p.Tag)
	}
	return tw.Flush()
}
