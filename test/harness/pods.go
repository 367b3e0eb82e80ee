package harness

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/sandbox"
)

// PodAgent is one process of a pod: the pause process that holds the pod's
// namespace (as a container runtime's does), or one end of a transfer
// between two pods. The ends follow Transfer's streams: connection i's
// client sends the stream of Seed+2i, its server that of Seed+2i+1.
type PodAgent struct {
	Role string `json:"role"` // "pause", "serve" or "client"
	// Addr is the server's address: where "serve" listens and "client" dials.
	Addr string `json:"addr"`
	// LocalAddr, for "client", is the address and port to connect from;
	// connection i uses port+i. Empty means any.
	LocalAddr   string `json:"local_addr,omitempty"`
	Bytes       int64  `json:"bytes,omitempty"`
	Seed        uint64 `json:"seed,omitempty"`
	Connections int    `json:"connections,omitempty"` // 0 means 1
	// Ready is a file created when "serve" listens or "client" has
	// connected; "pause" runs until it is removed.
	Ready string `json:"ready,omitempty"`
	// Go, for "client", is a file whose appearance starts the exchange,
	// so that the handshakes of several clients can be put in sequence
	// and their transfers still run at the same time.
	Go string `json:"go,omitempty"`
}

// Run runs the pod agent in this process.
func (p *PodAgent) Run() (*TransferResult, error) {
	switch p.Role {
	case "pause":
		waitFor(func() bool { _, err := os.Stat(p.Ready); return err != nil })
		return &TransferResult{}, nil
	case "serve":
		return p.serve()
	case "client":
		return p.client()
	}
	return nil, fmt.Errorf("no pod role %q", p.Role)
}

func (p *PodAgent) serve() (*TransferResult, error) {
	ln, err := net.Listen("tcp", p.Addr)
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	if err := os.WriteFile(p.Ready, nil, 0o644); err != nil {
		return nil, err
	}
	res := &TransferResult{Server: make([]Received, max(p.Connections, 1))}
	var wg sync.WaitGroup
	errs := make([]error, len(res.Server))
	for i := range res.Server {
		c, err := ln.Accept()
		if err != nil {
			return nil, err
		}
		defer c.Close()
		wg.Go(func() { res.Server[i], errs[i] = Exchange(c.(*net.TCPConn), p.Bytes, p.Seed+2*uint64(i)+1) })
	}
	wg.Wait()
	return res, errors.Join(errs...)
}

func (p *PodAgent) client() (*TransferResult, error) {
	res := &TransferResult{Client: make([]Received, max(p.Connections, 1))}
	conns := make([]*net.TCPConn, len(res.Client))
	for i := range conns {
		var d net.Dialer
		if p.LocalAddr != "" {
			host, port, err := net.SplitHostPort(p.LocalAddr)
			if err != nil {
				return nil, err
			}
			n, err := strconv.Atoi(port)
			if err != nil {
				return nil, err
			}
			d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(host), Port: n + i}
		}
		c, err := d.Dial("tcp", p.Addr)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		conns[i] = c.(*net.TCPConn)
	}
	if p.Ready != "" {
		if err := os.WriteFile(p.Ready, nil, 0o644); err != nil {
			return nil, err
		}
	}
	if p.Go != "" {
		waitFor(func() bool { _, err := os.Stat(p.Go); return err == nil })
	}
	segsBefore, err := TCPOutSegs()
	if err != nil {
		return nil, err
	}
	var wg sync.WaitGroup
	errs := make([]error, len(conns))
	for i, c := range conns {
		wg.Go(func() { res.Client[i], errs[i] = Exchange(c, p.Bytes, p.Seed+2*uint64(i)) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	segsAfter, err := TCPOutSegs()
	res.TCPOutSegs = segsAfter - segsBefore
	return res, err
}

func waitFor(cond func() bool) {
	for !cond() {
		time.Sleep(20 * time.Millisecond)
	}
}

// WaitForFile waits until path exists, failing the test after timeout.
func (e *Env) WaitForFile(path string, timeout time.Duration) {
	e.T.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			e.T.Fatalf("%s did not appear within %v", path, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Pod is a network namespace wired to a node's bridge, as a container
// runtime's bridge plugin wires a pod: a veth pair, one end (eth0) in the
// pod with the pod's address, the other end on the bridge.
type Pod struct {
	Name string
	Addr string // the pod's IP address
	NS   *sandbox.Netns
}

// NewBridge creates bridge name, up and without an address, in namespace
// node.
func (e *Env) NewBridge(node *sandbox.Netns, name string) {
	e.T.Helper()
	err := node.Do(func() error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}
		if err := netlink.LinkAdd(br); err != nil {
			return fmt.Errorf("creating bridge %s (is the bridge module loaded?): %w", name, err)
		}
		return netlink.LinkSetUp(br)
	})
	if err != nil {
		e.T.Fatal(err)
	}
}

// NewPod creates a pod namespace joined to bridge in namespace node, with
// cidr (e.g. 10.80.0.2/24) on its eth0. The namespace is released when
// the test ends.
func (e *Env) NewPod(node *sandbox.Netns, bridge, name, cidr string) *Pod {
	e.T.Helper()
	ns, err := sandbox.NewNetns()
	if err != nil {
		e.T.Fatal(err)
	}
	e.T.Cleanup(func() { ns.Close() })
	addr, err := netlink.ParseAddr(cidr)
	if err != nil {
		e.T.Fatal(err)
	}
	err = node.Do(func() error {
		br, err := netlink.LinkByName(bridge)
		if err != nil {
			return err
		}
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: "veth-" + name, MasterIndex: br.Attrs().Index},
			PeerName:      "eth0",
			PeerNamespace: netlink.NsFd(ns.Handle()),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("creating the veth pair of pod %s (is the veth module loaded?): %w", name, err)
		}
		return netlink.LinkSetUp(veth)
	})
	if err == nil {
		err = ns.Do(func() error {
			eth0, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			addr.Flags = unix.IFA_F_NODAD
			if err := netlink.AddrAdd(eth0, addr); err != nil {
				return err
			}
			return netlink.LinkSetUp(eth0)
		})
	}
	if err != nil {
		e.T.Fatal(err)
	}
	return &Pod{Name: name, Addr: addr.IP.String(), NS: ns}
}

// Pause starts the pod's pause process inside the test's cgroup, which
// makes the pod's namespace one that sockredir counts as local. It runs
// until the test ends.
func (e *Env) Pause(pod *Pod) {
	e.T.Helper()
	dir, err := os.MkdirTemp("", "sockredir-pause-")
	if err != nil {
		e.T.Fatal(err)
	}
	running := dir + "/running"
	if err := os.WriteFile(running, nil, 0o644); err != nil {
		e.T.Fatal(err)
	}
	a := e.StartIn(pod.NS, Scenario{Pod: &PodAgent{Role: "pause", Ready: running}}, 30*time.Minute)
	e.T.Cleanup(func() {
		os.RemoveAll(dir)
		var res TransferResult
		if err := a.Wait(&res); err != nil {
			e.T.Errorf("pause process of pod %s: %v", pod.Name, err)
		}
	})
}

// AgentEnv is the environment variable that makes this test binary, run
// with -test.run=^$, an agent for scenario s: for agents that something
// else starts, such as `sockredir run`.
func AgentEnv(s Scenario) (string, error) {
	spec, err := json.Marshal(s)
	return agentEnv + "=" + string(spec), err
}
