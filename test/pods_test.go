package test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/sandbox"
	"github.com/sockredir/sockredir/test/harness"
)

// podPair is a client pod and a server pod on one node's bridge.
type podPair struct {
	client, server *harness.Pod
}

// newPodPair wires two pods to a new bridge in node, with the same
// addresses on every node: 10.80.0.2 (client) and 10.80.0.3 (server).
func newPodPair(e *harness.Env, node *sandbox.Netns, prefix string) podPair {
	e.NewBridge(node, "br-"+prefix)
	return podPair{
		client: e.NewPod(node, "br-"+prefix, prefix+"c", "10.80.0.2/24"),
		server: e.NewPod(node, "br-"+prefix, prefix+"s", "10.80.0.3/24"),
	}
}

// podTransfer is the exchange of one connection from the client pod to
// port of the server pod, from local port port+33000 (so 40000 for 7000): a
// fixed 4-tuple. The client connects, then waits for goFile to exist before
// it sends.
type podTransfer struct {
	server, client *harness.Agent
	want           harness.Transfer
}

func startPodTransfer(e *harness.Env, p podPair, port int, bytes int64, seed uint64, goFile string) *podTransfer {
	e.T.Helper()
	dir := e.T.TempDir()
	listening, connected := filepath.Join(dir, "listening"), filepath.Join(dir, "connected")
	server := e.StartIn(p.server.NS, harness.Scenario{Pod: &harness.PodAgent{
		Role: "serve", Addr: fmt.Sprintf("%s:%d", p.server.Addr, port), Bytes: bytes, Seed: seed, Ready: listening,
	}}, 5*time.Minute)
	e.WaitForFile(listening, time.Minute)
	client := e.StartIn(p.client.NS, harness.Scenario{Pod: &harness.PodAgent{
		Role: "client", Addr: fmt.Sprintf("%s:%d", p.server.Addr, port), LocalAddr: fmt.Sprintf("%s:%d", p.client.Addr, port+33000),
		Bytes: bytes, Seed: seed, Ready: connected, Go: goFile,
	}}, 5*time.Minute)
	e.WaitForFile(connected, time.Minute)
	return &podTransfer{server: server, client: client, want: harness.Transfer{Bytes: bytes, Seed: seed}}
}

// check waits for both ends and checks what each received.
func (pt *podTransfer) check(t *testing.T) harness.TransferResult {
	t.Helper()
	var client, server harness.TransferResult
	if err := pt.client.Wait(&client); err != nil {
		t.Fatal(err)
	}
	if err := pt.server.Wait(&server); err != nil {
		t.Fatal(err)
	}
	client.Server = server.Server
	pt.want.Check(t, &client)
	return client
}

// Pods on one node, wired the way a container runtime does it: two pods on
// a bridge, each in its own network namespace, both in the accelerated
// cgroup. Two such pairs on two nodes use the very same 4-tuple at the
// same time; each must get exactly its own peer's bytes, all of them
// redirected. A pod outside the cgroup talking to a pod inside it is left
// alone.
func TestPodsOnOneNode(t *testing.T) {
	e := harness.New(t)
	secondNode, err := sandbox.NewNetns()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { secondNode.Close() })
	first, second := newPodPair(e, e.NS, "a"), newPodPair(e, secondNode, "b")
	outsider := e.NewPod(e.NS, "br-a", "out", "10.80.0.4/24")
	for _, pod := range []*harness.Pod{first.client, first.server, second.client, second.server} {
		e.Pause(pod)
	}
	e.Up(datapath.Config{}) // from the first node: it finds the pods through their pause processes

	dir := t.TempDir()
	goFile := filepath.Join(dir, "go")
	// Four streams at once with no upkeep to bound their queues (up
	// alone): 128 MiB each outran the readers of a 2 GiB guest under
	// emulation and hit tcp_mem (ENOMEM, docs/correctness.md, "Memory,
	// without the daemon"), which is not what this test is about.
	bytes := min(transferBytes(t), 32<<20)
	// The handshakes go one after the other; the transfers run at once.
	transfers := []*podTransfer{
		startPodTransfer(e, first, 7000, bytes, 100, goFile),
		startPodTransfer(e, second, 7000, bytes, 200, goFile),
	}
	if err := os.WriteFile(goFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, pt := range transfers {
		if res := pt.check(t); res.TCPOutSegs > handshakeSegments {
			t.Errorf("the client pod sent %d TCP segments for %d bytes: data took the TCP path", res.TCPOutSegs, 2*bytes)
		}
	}
	c := e.Status().Counters
	if c.SocketsAdded != 4 || c.BytesRedirected != uint64(4*bytes) || c.BytesPassed != 0 {
		t.Errorf("want the 4 sockets of both pairs added and all %d bytes redirected, got %+v", 4*bytes, c)
	}

	// The outsider's processes are not in the cgroup: its connection to a
	// pod that is must stay plain TCP.
	served := e.StartIn(first.server.NS, harness.Scenario{Pod: &harness.PodAgent{
		Role: "serve", Addr: first.server.Addr + ":7001", Bytes: 4 << 20, Seed: 300, Ready: filepath.Join(dir, "outsider-listening"),
	}}, 5*time.Minute)
	e.WaitForFile(filepath.Join(dir, "outsider-listening"), time.Minute)
	client := harness.PodAgent{Role: "client", Addr: first.server.Addr + ":7001", Bytes: 4 << 20, Seed: 300}
	var res *harness.TransferResult
	if err := outsider.NS.Do(func() (err error) { res, err = client.Run(); return err }); err != nil {
		t.Fatal(err)
	}
	var server harness.TransferResult
	if err := served.Wait(&server); err != nil {
		t.Fatal(err)
	}
	res.Server = server.Server
	(&harness.Transfer{Bytes: client.Bytes, Seed: client.Seed}).Check(t, res)
	if after := e.Status().Counters; after.SocketsAdded != c.SocketsAdded || after.BytesRedirected != c.BytesRedirected {
		t.Errorf("a connection from a pod outside the cgroup was touched: counters went from %+v to %+v", c, after)
	}
}
