package bench

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// progress shows how far the benchmark is: a bar redrawn in place on a
// terminal, otherwise one line per finished workload.
type progress struct {
	w        io.Writer
	terminal bool
	total    int
	done     int
	started  time.Time
}

func newProgress(w io.Writer, total int) *progress {
	p := &progress{w: w, total: total, started: time.Now()}
	if f, ok := w.(*os.File); ok {
		_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
		p.terminal = err == nil
	}
	return p
}

// step says that the next run, described by what, starts.
func (p *progress) step(what string) {
	if p.w == nil {
		return
	}
	if p.terminal {
		fmt.Fprintf(p.w, "\r\033[K%s %s", p.bar(), what)
	}
	p.done++
}

// note prints a line that stays (a finished workload).
func (p *progress) note(line string) {
	if p.w == nil {
		return
	}
	if p.terminal {
		fmt.Fprint(p.w, "\r\033[K")
	}
	fmt.Fprintln(p.w, line)
}

// finish clears the bar.
func (p *progress) finish() {
	if p.w != nil && p.terminal {
		fmt.Fprint(p.w, "\r\033[K")
	}
}

// bar is "[#####-----]  42% 1m10s left".
func (p *progress) bar() string {
	const width = 30
	frac := float64(p.done) / float64(max(p.total, 1))
	filled := int(frac * width)
	left := "?"
	if p.done > 0 {
		elapsed := time.Since(p.started)
		left = (time.Duration(float64(elapsed)/frac) - elapsed).Round(time.Second).String()
	}
	return fmt.Sprintf("[%s%s] %3.0f%% %s left", strings.Repeat("#", filled), strings.Repeat("-", width-filled), frac*100, left)
}
