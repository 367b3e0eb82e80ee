// Package trace streams the TCP events of the connections in the cgroup that
// a running sockredir datapath is attached to: connect, listen, establish,
// state changes, RTOs, retransmits and RTT samples, from a sock_ops program
// of its own (bpf/trace.c) that lives only as long as the Tracer.
//
// The program is attached with a BPF link that is never pinned, next to the
// datapath's: the kernel runs both, and closing the Tracer, or the end of
// the process that holds it (even by SIGKILL), detaches it.
package trace

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"

	"github.com/sockredir/sockredir/pkg/datapath"
)

// Options says what to trace.
type Options struct {
	// PinDir is the running datapath's pin directory; empty means
	// datapath.DefaultPinDir. Tracing follows its cgroup.
	PinDir string
	// Port keeps only sockets whose local or remote port it is; 0 keeps all.
	Port uint16
	// Addr keeps only sockets whose local or remote address is in it; the
	// zero Prefix keeps all. An IPv4 prefix also matches IPv4-mapped
	// addresses of IPv6 sockets.
	Addr netip.Prefix
	// RingSize is the ring buffer's size in bytes, a power of two and a
	// multiple of the page size; 0 means 1 MiB. When the reader falls
	// behind and it fills up, events are lost (see Tracer.Lost).
	RingSize uint32
}

// Tracer is an attached trace program and the reader of its events.
type Tracer struct {
	objs   traceObjects
	link   link.Link
	reader *ringbuf.Reader
	clock  clock
	cgroup string
	record ringbuf.Record
}

// ErrClosed is what Read returns once the Tracer is closed.
var ErrClosed = ringbuf.ErrClosed

// Start attaches a trace program to the cgroup of the datapath pinned in
// opts.PinDir. Only connections established from then on are traced: the
// others never asked for the callbacks (see docs/tracing.md).
func Start(opts Options) (*Tracer, error) {
	if opts.PinDir == "" {
		opts.PinDir = datapath.DefaultPinDir
	}
	cgroup, err := attachedCgroup(opts.PinDir)
	if err != nil {
		return nil, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("raising the locked-memory limit for BPF maps: %w", err)
	}
	spec, err := loadTrace()
	if err != nil {
		return nil, err
	}
	if opts.RingSize != 0 {
		spec.Maps[traceMapEvents].MaxEntries = opts.RingSize
	}
	network, mask := addrFilter(opts.Addr)
	for name, value := range map[string]any{
		traceVarFilterPort: opts.Port,
		traceVarFilterNet:  network,
		traceVarFilterMask: mask,
	} {
		if err := spec.Variables[name].Set(value); err != nil {
			return nil, fmt.Errorf("setting the trace filter %s: %w", name, err)
		}
	}

	t := &Tracer{cgroup: cgroup}
	if err := spec.LoadAndAssign(&t.objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			err = fmt.Errorf("%+v", ve) // the end of the log says why
		}
		return nil, fmt.Errorf("loading the trace program: %w", err)
	}
	if t.clock, err = newClock(); err != nil {
		t.objs.Close()
		return nil, err
	}
	if t.reader, err = ringbuf.NewReader(t.objs.Events); err != nil {
		t.objs.Close()
		return nil, fmt.Errorf("opening the trace ring buffer: %w", err)
	}
	// Never pinned: the attachment ends with the last file descriptor of
	// the link, at Close or when the process dies.
	t.link, err = link.AttachCgroup(link.CgroupOptions{
		Path:    cgroup,
		Attach:  ebpf.AttachCGroupSockOps,
		Program: t.objs.SockredirTrace,
	})
	if err != nil {
		t.reader.Close()
		t.objs.Close()
		return nil, fmt.Errorf("attaching the trace program to cgroup %s: %w", cgroup, err)
	}
	return t, nil
}

// Cgroup is the cgroup being traced.
func (t *Tracer) Cgroup() string { return t.cgroup }

// Read waits for the next event. It returns os.ErrDeadlineExceeded when the
// deadline set with SetDeadline passes first, and ErrClosed once the Tracer
// is closed. It must not be called from two goroutines at once.
func (t *Tracer) Read() (Event, error) {
	if err := t.reader.ReadInto(&t.record); err != nil {
		return Event{}, err
	}
	return decode(t.record.RawSample, t.clock)
}

// SetDeadline makes Read give up at deadline; the zero time waits for ever.
func (t *Tracer) SetDeadline(deadline time.Time) { t.reader.SetDeadline(deadline) }

// pending reports whether events are waiting in the ring buffer.
func (t *Tracer) pending() bool { return t.record.Remaining > 0 }

// Lost is how many events found the ring buffer full since Start.
func (t *Tracer) Lost() (uint64, error) {
	var perCPU []uint64
	if err := t.objs.LostEvents.Lookup(uint32(0), &perCPU); err != nil {
		return 0, fmt.Errorf("reading the lost-events counter: %w", err)
	}
	var total uint64
	for _, n := range perCPU {
		total += n
	}
	return total, nil
}

// Close detaches the trace program and interrupts a blocked Read. Sockets
// that got the extra callbacks keep them until they close; only the
// datapath's program, which ignores them, runs for them then.
func (t *Tracer) Close() error {
	return errors.Join(t.link.Close(), t.reader.Close(), t.objs.Close())
}

// Names of the datapath's pins that trace reads (see pkg/datapath/pins.go).
const (
	datapathLinkPin = "link_sockops"
	datapathMetaPin = "meta"
)

// The datapath's meta record (metaRecord in pkg/datapath/pins.go) starts
// with an 8-byte magic, the ABI version and the map size; the NUL-padded
// cgroup path follows.
var metaMagic = []byte("sockredr")

const metaCgroupOffset = 16

// attachedCgroup returns the cgroup that the datapath pinned in pinDir is
// attached to, from its meta map.
func attachedCgroup(pinDir string) (string, error) {
	notUp := fmt.Errorf("sockredir is not up in %s: run `sockredir up` first, or pass the --pin-dir it was started with", pinDir)
	if _, err := os.Stat(filepath.Join(pinDir, datapathLinkPin)); err != nil {
		if errors.Is(err, os.ErrPermission) {
			return "", datapath.ErrPrivileges
		}
		return "", notUp
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, datapathMetaPin), &ebpf.LoadPinOptions{ReadOnly: true})
	if errors.Is(err, os.ErrPermission) {
		return "", datapath.ErrPrivileges
	}
	if err != nil {
		return "", notUp
	}
	defer m.Close()
	rec, err := m.LookupBytes(uint32(0))
	if err != nil || len(rec) <= metaCgroupOffset || !bytes.HasPrefix(rec, metaMagic) {
		return "", fmt.Errorf("%s holds no sockredir datapath: pass the --pin-dir that `sockredir up` used", pinDir)
	}
	path, _, _ := bytes.Cut(rec[metaCgroupOffset:], []byte{0})
	return string(path), nil
}
