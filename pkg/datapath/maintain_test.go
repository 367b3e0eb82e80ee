package datapath

import (
	"slices"
	"testing"
	"time"
)

// A pair is released once, by its lower key, and only when both of its
// sockets send over TCP and have nothing redirected left to read.
func TestSettledWith(t *testing.T) {
	a := sockopsSockKey{LocalIp: [4]uint32{0, 0, 0xffff0000, 0x0100007f}, RemoteIp: [4]uint32{0, 0, 0xffff0000, 0x0100007f},
		LocalPort: 40000, RemotePort: 8080, LocalSeq: 11, RemoteSeq: 22, Family: 2, Netns: 4096}
	var b sockopsSockKey
	mirrorKey(&a, &b)
	if b.LocalPort != 8080 || b.RemotePort != 40000 || b.LocalSeq != 22 || b.RemoteSeq != 11 || b.Netns != 4096 {
		t.Fatalf("mirror of %+v: %+v", a, b)
	}
	lower, higher := a, b
	if !lowerOfPair(a) {
		lower, higher = b, a
	}
	if lowerOfPair(higher) == lowerOfPair(lower) {
		t.Fatal("lowerOfPair names both or neither of a pair")
	}
	passed := socketReport{Mode: modePass}
	var none sockopsSockKey
	for _, c := range []struct {
		name    string
		reports map[sockopsSockKey]socketReport
		key     sockopsSockKey
		refused sockopsSockKey // the socket that refused, if any
		want    int
	}{
		{"both pass, nothing unread", map[sockopsSockKey]socketReport{lower: passed, higher: passed}, lower, none, 2},
		{"asked by the higher key", map[sockopsSockKey]socketReport{lower: passed, higher: passed}, higher, none, 0},
		{"peer still redirects", map[sockopsSockKey]socketReport{lower: passed, higher: {Mode: 1}}, lower, none, 0},
		// A refusal is found by the socket's next message, but the
		// refusing reader may begin to splice first: sendersToStop
		// puts the socket on TCP, and the pair goes at a later check.
		{"peer redirects, but to a refusal", map[sockopsSockKey]socketReport{lower: passed, higher: {Mode: 1}}, lower, lower, 0},
		{"the redirecting socket refused itself", map[sockopsSockKey]socketReport{lower: passed, higher: {Mode: 1}}, lower, higher, 0},
		{"the peer redirects to a splice reader", map[sockopsSockKey]socketReport{lower: {Mode: modePass, Refused: refusedSplice}, higher: {Mode: 1}}, lower, none, 0},
		{"a refused pair, passing both ways", map[sockopsSockKey]socketReport{lower: passed, higher: passed}, lower, higher, 2},
		{"both redirect, neither refused", map[sockopsSockKey]socketReport{lower: {Mode: 1}, higher: {Mode: 1}}, lower, none, 0},
		{"bytes unread", map[sockopsSockKey]socketReport{lower: {Mode: modePass, Unread: 1}, higher: passed}, lower, none, 0},
		{"peer not seen", map[sockopsSockKey]socketReport{lower: passed}, lower, none, 0},
	} {
		reports := map[sockopsSockKey]socketReport{}
		for k, r := range c.reports {
			if k == c.refused {
				r.Refused = 3 // REFUSED_BACKLOG
			}
			reports[k] = r
		}
		if got := settledWith(c.key, reports[c.key], reports); len(got) != c.want {
			t.Errorf("%s: released %d sockets, want %d", c.name, len(got), c.want)
		}
	}
}

// A splice reader's queue is abandoned once it has gone unread for
// abandonTime, even as it grows; a queue that shrank, or a socket that
// refused for another reason, is not.
func TestAbandonedQueues(t *testing.T) {
	splicer, reader, lowat := sockopsSockKey{LocalPort: 1}, sockopsSockKey{LocalPort: 2}, sockopsSockKey{LocalPort: 3}
	start := time.Now()
	reports := func(readerUnread uint64) map[sockopsSockKey]socketReport {
		return map[sockopsSockKey]socketReport{
			splicer: {Unread: 200 - readerUnread, Refused: refusedSplice}, // grows
			reader:  {Unread: readerUnread, Refused: refusedSplice},
			lowat:   {Unread: 100, Refused: 1},
		}
	}
	watched, abandoned := abandonedQueues(nil, reports(100), start)
	if len(abandoned) != 0 || len(watched) != 2 {
		t.Fatalf("at once: abandoned %v, watching %v; want none, and the two splice readers", abandoned, watched)
	}
	// The reader read some of its queue meanwhile.
	watched, abandoned = abandonedQueues(watched, reports(50), start.Add(abandonTime))
	if !slices.Equal(abandoned, []sockopsSockKey{splicer}) {
		t.Fatalf("after %v: abandoned %v, want only the splice reader that read nothing", abandonTime, abandoned)
	}
	if _, ok := watched[reader]; !ok || len(watched) != 1 {
		t.Fatalf("after %v: watching %v, want the reader that read", abandonTime, watched)
	}
}

// A splice reader stops redirecting only once its peer passes and doesn't
// splice itself: then the pair can be released. While its peer redirects
// to it, its own TCP bytes would reach a socket still in the map.
// Sockets that still redirect (or haven't sent) are told to pass where
// that lets their pair be released: in a connection refused for another
// reason than splice, unless the peer splices, and a splice reader whose
// peer passes with nothing waiting.
func TestSendersToStop(t *testing.T) {
	socket := sockopsSockKey{LocalPort: 40000, RemotePort: 8080, LocalSeq: 11, RemoteSeq: 22, Family: 2}
	var peer sockopsSockKey
	mirrorKey(&socket, &peer)
	splicing := func(mode uint32) socketReport { return socketReport{Mode: mode, Refused: refusedSplice} }
	refusing := func(mode uint32) socketReport { return socketReport{Mode: mode, Refused: 1} } // REFUSED_LOWAT
	for _, c := range []struct {
		name    string
		reports map[sockopsSockKey]socketReport
		want    []sockopsSockKey
	}{
		{"a splicer, the peer passes", map[sockopsSockKey]socketReport{socket: splicing(1), peer: {Mode: modePass}}, []sockopsSockKey{socket}},
		{"a splicer, the peer passes with bytes waiting", map[sockopsSockKey]socketReport{socket: splicing(1), peer: {Mode: modePass, Unread: 10}}, nil},
		{"a splicer, the peer hasn't decided", map[sockopsSockKey]socketReport{socket: splicing(1), peer: {Mode: 0}}, nil},
		{"a splicer, the peer redirects", map[sockopsSockKey]socketReport{socket: splicing(1), peer: {Mode: 1}}, nil},
		{"a splicer, the peer splices too", map[sockopsSockKey]socketReport{socket: splicing(1), peer: splicing(modePass)}, nil},
		{"a splicer that passes already", map[sockopsSockKey]socketReport{socket: splicing(modePass), peer: {Mode: modePass}}, nil},
		{"a splicer whose peer is gone", map[sockopsSockKey]socketReport{socket: splicing(1)}, nil},
		{"the peer refused", map[sockopsSockKey]socketReport{socket: {Mode: 1}, peer: refusing(modePass)}, []sockopsSockKey{socket}},
		{"the peer refused, this one hasn't sent", map[sockopsSockKey]socketReport{socket: {Mode: 0}, peer: refusing(modePass)}, []sockopsSockKey{socket}},
		{"this one refused, but redirects to a splicer", map[sockopsSockKey]socketReport{socket: refusing(1), peer: splicing(modePass)}, nil},
		{"the peer refused, both pass already", map[sockopsSockKey]socketReport{socket: {Mode: modePass}, peer: refusing(modePass)}, nil},
		{"nobody refused", map[sockopsSockKey]socketReport{socket: {Mode: 1}, peer: {Mode: 1}}, nil},
	} {
		if got := sendersToStop(c.reports); !slices.Equal(got, c.want) {
			t.Errorf("%s: stop %v, want %v", c.name, got, c.want)
		}
	}
}

// down keeps both ends of a pair whose sender redirects to a splice reader.
func TestInSplicePair(t *testing.T) {
	reader := sockopsSockKey{LocalPort: 8080, RemotePort: 40000, LocalSeq: 22, RemoteSeq: 11, Family: 2}
	var sender sockopsSockKey
	mirrorKey(&reader, &sender)
	splicing := socketReport{Mode: modePass, Refused: refusedSplice}
	for _, c := range []struct {
		name    string
		reports map[sockopsSockKey]socketReport
		want    bool
	}{
		{"the sender redirects to the reader", map[sockopsSockKey]socketReport{reader: splicing, sender: {Mode: 1}}, true},
		{"the sender passes", map[sockopsSockKey]socketReport{reader: splicing, sender: {Mode: modePass}}, false},
		{"the sender hasn't sent", map[sockopsSockKey]socketReport{reader: splicing, sender: {Mode: 0}}, false},
		{"no splice", map[sockopsSockKey]socketReport{reader: {Mode: modePass}, sender: {Mode: 1}}, false},
		{"the sender is gone", map[sockopsSockKey]socketReport{reader: splicing}, false},
	} {
		for _, key := range []sockopsSockKey{reader, sender} {
			r, ok := c.reports[key]
			if !ok {
				continue
			}
			if got := inSplicePair(key, r, c.reports); got != c.want {
				t.Errorf("%s: inSplicePair(%d) = %v, want %v", c.name, key.LocalPort, got, c.want)
			}
		}
	}
}
