package main

import (
	"fmt"
	"io"
	"os"
)

// cpioWriter writes the "newc" cpio format the kernel unpacks as an
// initramfs. The first error sticks in err and turns later calls into
// no-ops, so callers check once at the end.
type cpioWriter struct {
	w     io.Writer
	inode uint32
	err   error
}

// File type bits of a cpio entry's mode, as in stat(2).
const (
	modeDir       = 0o040000
	modeRegular   = 0o100000
	modeSymlink   = 0o120000
	modeCharacter = 0o020000
	modeTypeMask  = 0o170000
)

func (c *cpioWriter) dir(name string) {
	c.entry(name, modeDir|0o755, nil, 0, 0)
}

func (c *cpioWriter) file(name string, data []byte, perm uint32) {
	c.entry(name, modeRegular|perm, data, 0, 0)
}

func (c *cpioWriter) fileFrom(name, hostPath string, perm uint32) {
	if c.err != nil {
		return
	}
	data, err := os.ReadFile(hostPath)
	if err != nil {
		c.err = err
		return
	}
	c.file(name, data, perm)
}

func (c *cpioWriter) symlink(name, target string) {
	c.entry(name, modeSymlink|0o777, []byte(target), 0, 0)
}

func (c *cpioWriter) charDevice(name string, major, minor uint32) {
	c.entry(name, modeCharacter|0o600, nil, major, minor)
}

// close writes the trailer entry that ends the archive.
func (c *cpioWriter) close() {
	c.entry("TRAILER!!!", 0, nil, 0, 0)
}

func (c *cpioWriter) entry(name string, mode uint32, data []byte, rdevMajor, rdevMinor uint32) {
	if c.err != nil {
		return
	}
	c.inode++
	nlink := 1
	if mode&modeTypeMask == modeDir {
		nlink = 2
	}
	// Fields: magic, ino, mode, uid, gid, nlink, mtime, filesize,
	// devmajor, devminor, rdevmajor, rdevminor, namesize, check.
	header := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	c.write([]byte(header + name + "\x00"))
	c.pad(len(header) + len(name) + 1)
	c.write(data)
	c.pad(len(data))
}

// pad aligns the stream to 4 bytes after a block of length n.
func (c *cpioWriter) pad(n int) {
	c.write(make([]byte, (4-n%4)%4))
}

func (c *cpioWriter) write(b []byte) {
	if c.err == nil {
		_, c.err = c.w.Write(b)
	}
}
