package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
)

// matrix is the final report: one row per test case, one column per run.
// Its JSON form is what docs are generated from.
type matrix struct {
	Columns []*column `json:"columns"`
	Tests   []testRow `json:"tests"`
}

type testRow struct {
	Name    string                `json:"name"`
	Results map[string]testStatus `json:"results"` // by column name
}

func newMatrix(columns []*column) *matrix {
	m := &matrix{Columns: columns}
	rowOf := map[string]int{}
	for _, col := range columns {
		for _, test := range col.console.tests {
			if _, ok := rowOf[test]; !ok {
				rowOf[test] = len(m.Tests)
				m.Tests = append(m.Tests, testRow{Name: test, Results: map[string]testStatus{}})
			}
			m.Tests[rowOf[test]].Results[col.Name] = col.console.status[test]
		}
	}
	for _, row := range m.Tests {
		for _, col := range columns {
			if _, ok := row.Results[col.Name]; !ok {
				row.Results[col.Name] = statusNotRun
			}
		}
	}
	return m
}

func (m *matrix) ok() bool {
	for _, col := range m.Columns {
		if col.failed() {
			return false
		}
	}
	return true
}

func (col *column) header() string {
	if col.Name == "host" {
		return "host " + col.Kernel
	}
	return col.Name
}

func (m *matrix) writeText(w io.Writer) error {
	table := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprint(table, "TEST")
	for _, col := range m.Columns {
		fmt.Fprint(table, "\t", col.header())
	}
	fmt.Fprintln(table)
	for _, row := range m.Tests {
		// Indent subtests under their parent.
		fmt.Fprint(table, strings.Repeat("  ", strings.Count(row.Name, "/")), row.Name)
		for _, col := range m.Columns {
			fmt.Fprint(table, "\t", row.Results[col.Name])
		}
		fmt.Fprintln(table)
	}
	fmt.Fprint(table, "(run result)")
	for _, col := range m.Columns {
		fmt.Fprint(table, "\t", col.Result)
	}
	fmt.Fprintln(table)
	if err := table.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintln(w, "\ncells: pass | FAIL | known-bad (skipped with "+knownBadMarker+") | skip | - (not run)")
	return err
}

func (m *matrix) writeMarkdown(w io.Writer) error {
	cells := func(values []string) {
		for i, v := range values {
			values[i] = strings.ReplaceAll(v, "|", `\|`)
		}
		fmt.Fprintf(w, "| %s |\n", strings.Join(values, " | "))
	}
	header := []string{"Test"}
	separator := []string{"---"}
	for _, col := range m.Columns {
		header = append(header, col.header())
		separator = append(separator, "---")
	}
	cells(header)
	cells(separator)
	for _, row := range m.Tests {
		values := []string{"`" + row.Name + "`"}
		for _, col := range m.Columns {
			values = append(values, string(row.Results[col.Name]))
		}
		cells(values)
	}
	results := []string{"*run result*"}
	for _, col := range m.Columns {
		results = append(results, col.Result)
	}
	cells(results)
	return nil
}

func (m *matrix) writeJSON(w io.Writer) error {
	encoder := json.NewEncoder(w)
	encoder.SetIndent("", "  ")
	return encoder.Encode(m)
}

func writeFile(path string, write func(io.Writer) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	buffered := bufio.NewWriter(f)
	if err := write(buffered); err != nil {
		f.Close()
		return err
	}
	if err := buffered.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
