package main

import (
	"bufio"
	"errors"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
)

// testStatus is one cell of the matrix.
type testStatus string

const (
	statusPass     testStatus = "pass"
	statusFail     testStatus = "FAIL"
	statusKnownBad testStatus = "known-bad"
	statusSkip     testStatus = "skip"
	statusNotRun   testStatus = "-"
)

// knownBadMarker in a test's log, followed by t.Skip, marks a failure we
// know about on that kernel: reported as known-bad, not as skip.
const knownBadMarker = "KNOWN-BAD:"

// consoleReport is what a run's output says, in `go test -v` format plus
// the markers /init prints.
type consoleReport struct {
	release  string // from the uname marker; empty on the host
	exited   bool   // the exit marker was seen
	exitCode int
	tests    []string // in order of first appearance
	status   map[string]testStatus
	// patchTrap: the kernel died of an int3 trap, as at a code patching
	// site that qemu's TCG ran stale (see whyBootAgain).
	patchTrap bool
}

// Lines are matched anywhere, not only at their start: kernel messages
// and terminal escapes on the serial console can precede them.
var (
	// Go prints "=== NAME" before output whenever the test producing
	// output changes, so this always tells whose log a line is.
	currentTestLine = regexp.MustCompile(`=== (?:RUN|CONT|NAME|PAUSE)\s+(\S+)`)
	resultLine      = regexp.MustCompile(`--- (PASS|FAIL|SKIP): (\S+) \(`)
	unameLine       = regexp.MustCompile(unameMarker + ` (\S+)`)
	exitLine        = regexp.MustCompile(exitMarker + ` (\d+)`)
	// "Oops: int3: 0000 [#1]" (6.12), "int3: 0000 [#1]" (6.1).
	patchTrapLine = regexp.MustCompile(`\bint3: [0-9a-f]{4} \[#\d+\]`)
)

func parseConsoleFile(file string) (*consoleReport, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseConsole(f)
}

func parseConsole(r io.Reader) (*consoleReport, error) {
	report := &consoleReport{status: map[string]testStatus{}}
	knownBad := map[string]bool{}
	currentTest := ""
	lines := bufio.NewReader(r)
	for {
		line, err := lines.ReadString('\n') // no line length limit
		line = strings.TrimRight(line, "\r\n")
		if m := currentTestLine.FindStringSubmatch(line); m != nil {
			currentTest = m[1]
			report.saw(currentTest)
		} else if m := resultLine.FindStringSubmatch(line); m != nil {
			report.saw(m[2])
			report.status[m[2]] = map[string]testStatus{"PASS": statusPass, "FAIL": statusFail, "SKIP": statusSkip}[m[1]]
			if m[1] == "SKIP" && knownBad[m[2]] {
				report.status[m[2]] = statusKnownBad
			}
		} else if strings.Contains(line, knownBadMarker) && currentTest != "" {
			knownBad[currentTest] = true
		} else if m := unameLine.FindStringSubmatch(line); m != nil {
			report.release = m[1]
		} else if m := exitLine.FindStringSubmatch(line); m != nil {
			report.exited = true
			report.exitCode, _ = strconv.Atoi(m[1])
		} else if patchTrapLine.MatchString(line) {
			report.patchTrap = true
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	// A test that started but never reported was cut short by a crash or
	// a timeout.
	for _, name := range report.tests {
		if report.status[name] == "" {
			report.status[name] = statusFail
		}
	}
	return report, nil
}

// saw records a test name, keeping the order of first appearance.
func (r *consoleReport) saw(test string) {
	if _, ok := r.status[test]; !ok {
		r.tests = append(r.tests, test)
		r.status[test] = ""
	}
}

func (r *consoleReport) anyFailed() bool {
	for _, status := range r.status {
		if status == statusFail {
			return true
		}
	}
	return false
}
