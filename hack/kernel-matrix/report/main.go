// Command report turns the kernel matrix's per-kernel results into one
// table: kernel x test -> pass / FAIL / skip, the reason for each failure
// and skip, and the mechanisms the datapath loader picked on each kernel.
//
// It reads the directory run.sh fills:
//
//	<results>/kernels.tsv      one line per kernel, in matrix order:
//	                           suite<TAB>release<TAB>test set
//	<results>/<suite>/vm       how the guest ran: kvm or tcg (absent: never booted)
//	<results>/<suite>/note     the host's word on a guest that failed to run
//	<results>/<suite>/features the probe's "features ..." line
//	<results>/<suite>/test.json the test binary's output through test2json
//	<results>/<suite>/exit     the test binary's exit status
//
// It prints the table on stdout, writes it as Markdown with -markdown, and
// exits 1 when any test failed, any kernel produced no result, or a test
// binary exited non-zero without a failing test to show for it.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

func main() {
	results := flag.String("results", ".cache/kernel-matrix/results", "results directory written by run.sh")
	markdown := flag.String("markdown", "", "also write the table as Markdown to this file")
	flag.Parse()
	m, err := load(*results)
	if err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(2)
	}
	m.writeText(os.Stdout)
	if *markdown != "" {
		f, err := os.Create(*markdown)
		if err == nil {
			m.writeMarkdown(f)
			err = f.Close()
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "report:", err)
			os.Exit(2)
		}
	}
	if !m.ok() {
		os.Exit(1)
	}
}

// Result is the outcome of one test on one kernel.
type Result string

const (
	Pass       Result = "pass"
	Fail       Result = "FAIL"
	Skip       Result = "skip"
	Unfinished Result = "FAIL (unfinished)" // started, never reported: timeout or crash
	NotRun     Result = "-"
)

// Kernel is one column of the matrix.
type Kernel struct {
	Suite, Release, Set string
	VM                  string // kvm, tcg, or "" when the guest never ran the tests
	Note                string // why the guest produced no results
	Features            Features
	Exit                string // the test binary's exit status, "" when unknown
	Results             map[string]Result
	// Reasons holds, per failed or skipped test (any depth), the line of
	// its output that says why.
	Reasons map[string]string
	// order lists the tests in the order they first reported.
	order []string
}

// Features are the loader's choices, parsed from its summary line
// "kernel=... attach=... reuseport-assign=...".
type Features struct {
	Line, Attach, ReusePort string
}

// Matrix is every kernel with the union of the tests they ran.
type Matrix struct {
	Kernels []*Kernel
	// Rows are the tests shown as table rows (top level and one level of
	// subtests), in first-seen order.
	Rows []string
}

func load(dir string) (*Matrix, error) {
	f, err := os.Open(filepath.Join(dir, "kernels.tsv"))
	if err != nil {
		return nil, fmt.Errorf("open kernel list: %w", err)
	}
	defer f.Close()
	m := &Matrix{}
	seen := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), "\t")
		if len(fields) != 3 {
			continue
		}
		k, err := loadKernel(filepath.Join(dir, fields[0]), fields[0], fields[1], fields[2])
		if err != nil {
			return nil, err
		}
		m.Kernels = append(m.Kernels, k)
		for _, name := range k.order {
			if !seen[name] && strings.Count(name, "/") <= 1 {
				seen[name] = true
				m.Rows = append(m.Rows, name)
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read kernel list: %w", err)
	}
	if len(m.Kernels) == 0 {
		return nil, errors.New("no kernels in " + filepath.Join(dir, "kernels.tsv"))
	}
	return m, nil
}

func loadKernel(dir, suite, release, set string) (*Kernel, error) {
	k := &Kernel{Suite: suite, Release: release, Set: set, Results: map[string]Result{}, Reasons: map[string]string{}}
	k.VM = readLine(filepath.Join(dir, "vm"))
	k.Note = readLine(filepath.Join(dir, "note"))
	k.Exit = readLine(filepath.Join(dir, "exit"))
	k.Features = parseFeatures(readLine(filepath.Join(dir, "features")))
	f, err := os.Open(filepath.Join(dir, "test.json"))
	if errors.Is(err, os.ErrNotExist) {
		return k, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open results of %s: %w", suite, err)
	}
	defer f.Close()
	if err := k.parseEvents(f); err != nil {
		return nil, fmt.Errorf("parse results of %s: %w", suite, err)
	}
	return k, nil
}

// readLine returns the first line of a file, or "" when it does not exist.
func readLine(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	line, _, _ := strings.Cut(string(b), "\n")
	return strings.TrimSpace(line)
}

var featureField = regexp.MustCompile(`(\w[\w-]*)=(\S+)`)

func parseFeatures(line string) Features {
	f := Features{Line: strings.TrimPrefix(line, "features ")}
	for _, m := range featureField.FindAllStringSubmatch(f.Line, -1) {
		switch m[1] {
		case "attach":
			f.Attach = m[2]
		case "reuseport-assign":
			f.ReusePort = m[2]
		}
	}
	return f
}

// event is one line of `go tool test2json` output.
type event struct {
	Action string
	Test   string
	Output string
}

// reasonLine matches the location prefix testing puts before t.Log,
// t.Error, t.Skip and t.Fatal messages.
var reasonLine = regexp.MustCompile(`^\s*\w[\w.-]*\.go:\d+: `)

func (k *Kernel) parseEvents(r io.Reader) error {
	out := map[string][]string{}
	dec := json.NewDecoder(r)
	for {
		var e event
		if err := dec.Decode(&e); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return err
		}
		if e.Test == "" {
			continue
		}
		switch e.Action {
		case "run":
			if _, ok := k.Results[e.Test]; !ok {
				k.order = append(k.order, e.Test)
			}
			k.Results[e.Test] = Unfinished
		case "pass":
			k.Results[e.Test] = Pass
		case "fail":
			k.Results[e.Test] = Fail
		case "skip":
			k.Results[e.Test] = Skip
		case "output":
			out[e.Test] = append(out[e.Test], e.Output)
		}
	}
	for name, res := range k.Results {
		if res != Pass {
			k.Reasons[name] = reason(out[name])
		}
	}
	return nil
}

// reason picks the line that explains a failure or skip: the first message
// logged at a file:line, else the last output line that is not testing's
// own bookkeeping.
func reason(lines []string) string {
	var last string
	for _, l := range lines {
		if reasonLine.MatchString(l) {
			return clip(strings.TrimSpace(l))
		}
		t := strings.TrimSpace(l)
		if t != "" && !strings.HasPrefix(t, "=== ") && !strings.HasPrefix(t, "--- ") {
			last = t
		}
	}
	return clip(last)
}

func clip(s string) string {
	const max = 240
	if len(s) > max {
		return s[:max] + "..."
	}
	return s
}

// result is what a cell shows; tests a kernel did not run show NotRun.
func (k *Kernel) result(test string) Result {
	if r, ok := k.Results[test]; ok {
		return r
	}
	return NotRun
}

// failed reports whether the kernel's column counts as a failure.
func (k *Kernel) failed() bool {
	if len(k.Results) == 0 {
		return true // never ran: no verdict is a failing verdict
	}
	anyFail := false
	for _, r := range k.Results {
		if r == Fail || r == Unfinished {
			anyFail = true
		}
	}
	return anyFail || (k.Exit != "" && k.Exit != "0")
}

func (m *Matrix) ok() bool {
	for _, k := range m.Kernels {
		if k.failed() {
			return false
		}
	}
	return true
}

func (k *Kernel) header() string { return k.Release + " (" + k.Suite + ")" }

// table is the matrix as rows of cells, header first, shared by both
// output formats.
func (m *Matrix) table() [][]string {
	head := []string{"test"}
	for _, k := range m.Kernels {
		head = append(head, k.header())
	}
	rows := [][]string{head}
	for _, test := range m.Rows {
		row := []string{test}
		for _, k := range m.Kernels {
			row = append(row, string(k.result(test)))
		}
		rows = append(rows, row)
	}
	for _, extra := range []struct {
		name string
		cell func(*Kernel) string
	}{
		{"test set", func(k *Kernel) string { return k.Set }},
		{"vm", func(k *Kernel) string { return orDash(k.VM) }},
		{"attach", func(k *Kernel) string { return orDash(k.Features.Attach) }},
		{"reuseport-assign", func(k *Kernel) string { return orDash(k.Features.ReusePort) }},
		{"test binary exit", func(k *Kernel) string { return orDash(k.Exit) }},
	} {
		row := []string{extra.name}
		for _, k := range m.Kernels {
			row = append(row, extra.cell(k))
		}
		rows = append(rows, row)
	}
	return rows
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// notesPerRow bounds the notes of one table row (a test and one level of
// subtests): a scenario table failing for one cause fails dozens of
// subtests with the same message, and the first few tell the story.
const notesPerRow = 3

// notes lists, per kernel, why it has no results and why each test failed
// or was skipped, deepest subtests included, at most notesPerRow per row.
func (m *Matrix) notes() []string {
	var out []string
	for _, k := range m.Kernels {
		if k.Note != "" {
			out = append(out, fmt.Sprintf("%s: %s", k.Release, k.Note))
		}
		shown := map[string]int{}
		var rows []string
		for _, test := range k.order {
			r := k.Results[test]
			if r == Pass || k.coveredByChild(test) {
				continue
			}
			row := rowOf(test)
			if shown[row] == 0 {
				rows = append(rows, row)
			}
			shown[row]++
			if shown[row] <= notesPerRow {
				out = append(out, fmt.Sprintf("%s %s: %s: %s", k.Release, test, r, k.Reasons[test]))
			}
		}
		for _, row := range rows {
			if n := shown[row] - notesPerRow; n > 0 {
				out = append(out, fmt.Sprintf("%s %s: %d more not passed (see %s/test.log)", k.Release, row, n, k.Suite))
			}
		}
	}
	return out
}

// rowOf is the table row a test belongs to: its name cut after the first
// subtest level.
func rowOf(test string) string {
	parts := strings.SplitN(test, "/", 3)
	return strings.Join(parts[:min(len(parts), 2)], "/")
}

// coveredByChild reports whether a failed test only failed because a
// subtest did, which then has its own, more precise note.
func (k *Kernel) coveredByChild(test string) bool {
	if k.Results[test] != Fail {
		return false
	}
	for name, r := range k.Results {
		if strings.HasPrefix(name, test+"/") && (r == Fail || r == Unfinished) {
			return true
		}
	}
	return false
}

func (m *Matrix) writeText(w io.Writer) {
	rows := m.table()
	widths := make([]int, len(rows[0]))
	for _, row := range rows {
		for i, c := range row {
			widths[i] = max(widths[i], len(c))
		}
	}
	for _, row := range rows {
		var b strings.Builder
		for i, c := range row {
			fmt.Fprintf(&b, "%-*s  ", widths[i], c)
		}
		fmt.Fprintln(w, strings.TrimRight(b.String(), " "))
	}
	if notes := m.notes(); len(notes) > 0 {
		fmt.Fprintln(w, "\nfailures and skips:")
		for _, n := range notes {
			fmt.Fprintln(w, "  "+n)
		}
	}
	for _, k := range m.Kernels {
		if k.Features.Line != "" {
			fmt.Fprintf(w, "loader on %s: %s\n", k.Release, k.Features.Line)
		}
	}
}

func (m *Matrix) writeMarkdown(w io.Writer) {
	rows := m.table()
	for i, row := range rows {
		fmt.Fprintf(w, "| %s |\n", strings.Join(row, " | "))
		if i == 0 {
			fmt.Fprintf(w, "|%s\n", strings.Repeat("---|", len(row)))
		}
	}
	if notes := m.notes(); len(notes) > 0 {
		fmt.Fprintln(w, "\nFailures and skips:")
		for _, n := range notes {
			fmt.Fprintf(w, "- `%s`\n", strings.ReplaceAll(n, "`", "'"))
		}
	}
}
