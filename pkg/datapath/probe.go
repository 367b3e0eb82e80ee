package datapath

import (
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// KernelRules are what the running kernel does with sockets in a sockmap
// that its version number doesn't tell reliably (stable backports differ);
// they are measured, not looked up.
type KernelRules struct {
	// FIONREADCountsRedirected: FIONREAD includes bytes redirected into a
	// socket. False on 6.1 (tcp_bpf has no ioctl there): applications that
	// size their reads with FIONREAD see 0 bytes waiting.
	FIONREADCountsRedirected bool `json:"fionread_counts_redirected"`
	// FIONREADCountsTCP: FIONREAD of a socket in a sockmap includes bytes
	// that came over TCP. False on kernels with 929e30f93125 but not
	// 04af4efde58a (6.18.14 and later, for one).
	FIONREADCountsTCP bool `json:"fionread_counts_tcp"`
}

// ProbeKernel measures KernelRules on a loopback connection of its own, in
// the caller's network namespace.
func ProbeKernel() (KernelRules, error) {
	var rules KernelRules
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.SockMap, KeySize: 4, ValueSize: 4, MaxEntries: 2})
	if err != nil {
		return rules, err
	}
	defer m.Close()
	// Every message goes into the receive queue of the socket at index 1.
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SkMsg,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.LoadMapPtr(asm.R2, m.FD()),
			asm.Mov.Imm(asm.R3, 1),
			asm.Mov.Imm(asm.R4, 1), // BPF_F_INGRESS
			asm.FnMsgRedirectMap.Call(),
			asm.Return(),
		},
	})
	if err != nil {
		return rules, err
	}
	defer prog.Close()
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target: m.FD(), Program: prog, Attach: ebpf.AttachSkMsgVerdict,
	}); err != nil {
		return rules, err
	}

	// Blocking sockets: an attached sockredir leaves them alone.
	client, server, err := loopbackPair()
	if err != nil {
		return rules, fmt.Errorf("probing FIONREAD: %w", err)
	}
	defer unix.Close(client)
	defer unix.Close(server)
	if err := m.Put(uint32(1), uint32(server)); err != nil {
		return rules, err
	}
	if rules.FIONREADCountsTCP, err = fionreadSees(client, server, 100); err != nil {
		return rules, err
	}
	if err := m.Put(uint32(0), uint32(client)); err != nil {
		return rules, err
	}
	rules.FIONREADCountsRedirected, err = fionreadSees(client, server, 1000)
	return rules, err
}

// fionreadSees sends n bytes from client and reports whether FIONREAD on
// server then says n, and reads them out.
func fionreadSees(client, server, n int) (bool, error) {
	if _, err := unix.Write(client, make([]byte, n)); err != nil {
		return false, err
	}
	fds := []unix.PollFd{{Fd: int32(server), Events: unix.POLLIN}}
	if k, err := unix.Poll(fds, 1000); err != nil || k == 0 {
		return false, errors.Join(errors.New("probe bytes never arrived"), err)
	}
	time.Sleep(10 * time.Millisecond) // the rest of them, if they took TCP
	waiting, err := unix.IoctlGetInt(server, unix.SIOCINQ)
	if err != nil {
		return false, err
	}
	buf := make([]byte, n)
	for got := 0; got < n; {
		k, err := unix.Read(server, buf[got:])
		if err != nil || k == 0 {
			return false, errors.Join(errors.New("reading probe bytes"), err)
		}
		got += k
	}
	return waiting == n, nil
}

func loopbackPair() (client, server int, err error) {
	ln, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, -1, err
	}
	defer unix.Close(ln)
	loopback := &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}
	if err := unix.Bind(ln, loopback); err != nil {
		return -1, -1, err
	}
	if err := unix.Listen(ln, 1); err != nil {
		return -1, -1, err
	}
	addr, err := unix.Getsockname(ln)
	if err != nil {
		return -1, -1, err
	}
	if client, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
		return -1, -1, err
	}
	if err := unix.Connect(client, addr); err != nil {
		unix.Close(client)
		return -1, -1, err
	}
	if server, _, err = unix.Accept4(ln, unix.SOCK_CLOEXEC); err != nil {
		unix.Close(client)
		return -1, -1, err
	}
	return client, server, nil
}
