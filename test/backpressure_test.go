package test

import (
	"testing"
	"time"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/test/harness"
)

// A reader that stops reading holds its sender back, as over plain TCP:
// with the backlog limit checking (as `sockredir daemon` does), the
// connection goes on over TCP once the reader has more than the limit
// waiting, and every byte still arrives, in order.
func TestBacklogLimitHoldsSenderBack(t *testing.T) {
	e := harness.New(t)
	e.Up(datapath.Config{})
	bytes := 2 * transferBytes(t)
	limiter, err := datapath.NewBacklogLimiter(e.PinDir, uint64(bytes/32))
	if err != nil {
		t.Fatal(err)
	}
	defer limiter.Close()
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				if _, err := limiter.Check(); err != nil {
					t.Errorf("checking backlogs: %v", err)
					return
				}
			}
		}
	}()

	tr := harness.Transfer{Listen: "127.0.0.1:0", Bytes: bytes, Seed: 21, OneWay: true, ServerReadDelay: 2 * time.Second}
	var res harness.TransferResult
	e.Run(harness.Scenario{Transfer: &tr}, &res)
	close(stop)
	<-stopped
	tr.Check(t, &res)
	c := e.Status().Counters
	t.Logf("%d of %d bytes redirected before the reader refused", c.BytesRedirected, bytes)
	if c.InboundRefused != 1 || c.BytesPassed == 0 || c.BytesRedirected >= uint64(bytes)/2 {
		t.Errorf("want the reader to refuse once and most of the %d bytes to go over TCP; counters %+v", bytes, c)
	}
}
