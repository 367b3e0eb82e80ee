// Package sandbox makes the throwaway cgroups and network namespaces that
// `sockredir run`, the benchmark and the tests accelerate, and starts
// processes inside them. Nothing here touches a cgroup or namespace it did
// not create.
package sandbox

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sockredir/sockredir/pkg/hostfs"
)

// Cgroup is a cgroup v2 directory this package created.
type Cgroup struct {
	Path string
}

// NewCgroup creates a cgroup named prefix plus a random suffix below the
// root of the cgroup v2 hierarchy.
func NewCgroup(prefix string) (*Cgroup, error) {
	root, err := hostfs.CgroupV2Mount()
	if err != nil {
		return nil, err
	}
	path := filepath.Join(root, prefix+RandomSuffix())
	if err := os.Mkdir(path, 0o755); err != nil {
		return nil, fmt.Errorf("creating cgroup: %w", err)
	}
	return &Cgroup{Path: path}, nil
}

// RandomSuffix tells apart the sandboxes of concurrent runs.
func RandomSuffix() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Remove removes the cgroup, waiting up to timeout for its processes to go.
func (c *Cgroup) Remove(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := os.Remove(c.Path)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("removing cgroup %s: %w", c.Path, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Command prepares cmd to start inside the cgroup (clone3's
// CLONE_INTO_CGROUP: it never runs a moment outside it). The returned
// function releases the cgroup handle once cmd has started.
func (c *Cgroup) Command(cmd *exec.Cmd) (release func(), err error) {
	fd, err := unix.Open(c.Path, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening cgroup %s: %w", c.Path, err)
	}
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.UseCgroupFD = true
	cmd.SysProcAttr.CgroupFD = fd
	return func() { unix.Close(fd) }, nil
}

// Netns is a network namespace this package created, with loopback up.
type Netns struct {
	handle netns.NsHandle
}

// NewNetns creates a network namespace and brings its loopback up, leaving
// the caller's thread where it was.
func NewNetns() (*Netns, error) {
	var handle netns.NsHandle
	err := onThrowawayThread(func() (err error) {
		handle, err = netns.New()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("creating a network namespace: %w", err)
	}
	n := &Netns{handle: handle}
	err = n.Do(func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	if err != nil {
		n.Close()
		return nil, fmt.Errorf("bringing up loopback: %w", err)
	}
	return n, nil
}

// Handle is the namespace's handle, e.g. for moving a link into it.
func (n *Netns) Handle() netns.NsHandle { return n.handle }

// Close releases the namespace; it goes away with its last process.
func (n *Netns) Close() error { return n.handle.Close() }

// Do runs fn on a thread inside the namespace. Sockets fn opens and
// processes it starts belong to the namespace; a process started in fn gets
// SIGKILL (Pdeathsig) if fn returns before it ends, so fn should wait for it.
func (n *Netns) Do(fn func() error) error {
	return onThrowawayThread(func() error {
		if err := netns.Set(n.handle); err != nil {
			return fmt.Errorf("entering the network namespace: %w", err)
		}
		return fn()
	})
}

// onThrowawayThread runs fn on an OS thread of its own that exits afterwards,
// so that whatever fn changes about its thread (the namespace) never leaks
// to other goroutines.
func onThrowawayThread(fn func() error) error {
	done := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		done <- fn()
	}()
	return <-done
}
