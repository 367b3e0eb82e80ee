package trace

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"go.uber.org/zap"
)

// Format is how Run writes events.
type Format int

const (
	// Text writes each event as its String line.
	Text Format = iota
	// JSON writes one JSON object per line.
	JSON
)

// lostCheckInterval is how often Run looks at the lost-events counter.
const lostCheckInterval = time.Second

// Run traces until ctx is done, writing every event to out in format. log
// (nil: none) gets a line when tracing starts and a warning whenever events
// were lost. It drains the ring buffer before it returns, and detaches.
func Run(ctx context.Context, opts Options, format Format, out io.Writer, log *zap.Logger) error {
	if log == nil {
		log = zap.NewNop()
	}
	t, err := Start(opts)
	if err != nil {
		return err
	}
	defer t.Close()
	log.Info("tracing the connections opened from now on", zap.String("cgroup", t.Cgroup()))

	// Flush makes Read return what is already in the ring, then ErrFlushed.
	stop := context.AfterFunc(ctx, func() { t.reader.Flush() })
	defer stop()

	w := bufio.NewWriter(out)
	enc := json.NewEncoder(w)
	var reported uint64
	reportLost := func() error {
		lost, err := t.Lost()
		if err != nil {
			return err
		}
		if lost > reported {
			log.Warn(fmt.Sprintf("%d events lost: the ring buffer was full (narrow the trace with --port or --addr)", lost-reported),
				zap.Uint64("lost_total", lost))
			reported = lost
		}
		return nil
	}
	lastCheck := time.Now()
	for {
		t.SetDeadline(time.Now().Add(lostCheckInterval))
		ev, err := t.Read()
		switch {
		case err == nil:
			if format == JSON {
				err = enc.Encode(ev)
			} else {
				_, err = fmt.Fprintln(w, ev)
			}
			if err != nil {
				return err
			}
			if t.pending() {
				continue // write in batches while the ring is busy
			}
		case errors.Is(err, os.ErrDeadlineExceeded):
		case errors.Is(err, ringbuf.ErrFlushed) && ctx.Err() != nil:
			return errors.Join(w.Flush(), reportLost())
		default:
			return err
		}
		if err := w.Flush(); err != nil {
			return err
		}
		if time.Since(lastCheck) >= lostCheckInterval {
			lastCheck = time.Now()
			if err := reportLost(); err != nil {
				return err
			}
		}
	}
}
