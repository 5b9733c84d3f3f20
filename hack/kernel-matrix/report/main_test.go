package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// testLog is -test.v output as the guests write it: subtests, a skip with
// its reason, a failure inside a subtest, slog lines interleaved, and a
// test the binary never finished (a timeout or a crash).
const testLog = `=== RUN   TestEgressClassification
--- PASS: TestEgressClassification (0.65s)
=== RUN   TestBehaviours
=== RUN   TestBehaviours/tcx
2026/11/23 17:00:09 INFO datapath ready root=/tmp/x features="kernel=5.10.0-32-amd64 attach=tcx reuseport-assign=false"
=== RUN   TestBehaviours/tcx/01-inbound/v4
    scenario.go:341: enroll A with ebpf-tcx: tcx not supported (requires >= v6.6)
=== RUN   TestBehaviours/clsact
--- FAIL: TestBehaviours (2.00s)
    --- FAIL: TestBehaviours/tcx (1.00s)
        --- FAIL: TestBehaviours/tcx/01-inbound/v4 (0.50s)
    --- PASS: TestBehaviours/clsact (1.00s)
=== RUN   TestMarkSpoofing
    lifecycle_test.go:280: cgroup v2 not mounted
--- SKIP: TestMarkSpoofing (0.00s)
=== RUN   TestUpgradeKeepsFlows
`

// writeKernel lays out one kernel's result directory as run.sh does.
func writeKernel(t *testing.T, dir, suite string, files map[string]string) {
	t.Helper()
	d := filepath.Join(dir, suite)
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(d, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// toJSON converts -test.v output with the real test2json, as run.sh does.
func toJSON(t *testing.T, log string) string {
	t.Helper()
	cmd := exec.Command("go", "tool", "test2json", "-p", "datapath")
	cmd.Stdin = strings.NewReader(log)
	out, err := cmd.Output()
	if err != nil {
		t.Skipf("go tool test2json unavailable: %v", err)
	}
	return string(out)
}

func TestReport(t *testing.T) {
	dir := t.TempDir()
	tsv := "bullseye\t5.10.0-32-amd64\tbehaviour\nsid\t7.2.13+deb14-amd64\tverifier\n"
	if err := os.WriteFile(filepath.Join(dir, "kernels.tsv"), []byte(tsv), 0o644); err != nil {
		t.Fatal(err)
	}
	writeKernel(t, dir, "bullseye", map[string]string{
		"vm":        "tcg\n",
		"exit":      "1\n",
		"features":  "features kernel=5.10.0-32-amd64 attach=clsact reuseport-assign=false\n",
		"test.json": toJSON(t, testLog),
	})
	writeKernel(t, dir, "sid", map[string]string{"note": "did not boot under kvm tcg\n"})

	m, err := load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if m.ok() {
		t.Error("matrix with failures reported ok")
	}
	old, sid := m.Kernels[0], m.Kernels[1]
	for test, want := range map[string]Result{
		"TestEgressClassification":  Pass,
		"TestBehaviours":            Fail,
		"TestBehaviours/tcx":        Fail,
		"TestBehaviours/clsact":     Pass,
		"TestMarkSpoofing":          Skip,
		"TestUpgradeKeepsFlows":     Unfinished,
		"TestNoSuchTest":            NotRun,
		"TestBehaviours/tcx/01-inb": NotRun,
	} {
		if got := old.result(test); got != want {
			t.Errorf("%s on 5.10 = %q, want %q", test, got, want)
		}
	}
	if got := sid.result("TestEgressClassification"); got != NotRun {
		t.Errorf("kernel that never booted shows %q", got)
	}
	if old.Features.Attach != "clsact" || old.Features.ReusePort != "false" {
		t.Errorf("features = %+v", old.Features)
	}
	// Rows stop at one level of subtests; deeper failures go to the notes.
	for _, row := range m.Rows {
		if strings.Count(row, "/") > 1 {
			t.Errorf("row %q is deeper than one subtest level", row)
		}
	}

	var text strings.Builder
	m.writeText(&text)
	for _, want := range []string{
		"5.10.0-32-amd64 TestBehaviours/tcx/01-inbound/v4: FAIL: scenario.go:341: enroll A with ebpf-tcx: tcx not supported (requires >= v6.6)",
		"5.10.0-32-amd64 TestMarkSpoofing: skip: lifecycle_test.go:280: cgroup v2 not mounted",
		"5.10.0-32-amd64 TestUpgradeKeepsFlows: FAIL (unfinished)",
		"7.2.13+deb14-amd64: did not boot under kvm tcg",
		"loader on 5.10.0-32-amd64: kernel=5.10.0-32-amd64 attach=clsact reuseport-assign=false",
	} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, text.String())
		}
	}
	// A parent that failed only through its subtest gets no note of its own.
	if strings.Contains(text.String(), "TestBehaviours: FAIL") {
		t.Errorf("report repeats the parent of a failed subtest:\n%s", text.String())
	}

	var md strings.Builder
	m.writeMarkdown(&md)
	if !strings.Contains(md.String(), "| TestMarkSpoofing | skip | - |") {
		t.Errorf("markdown row missing:\n%s", md.String())
	}
}

func TestReportBoundsNotes(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "kernels.tsv"), []byte("bullseye\t5.10\tbehaviour\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var log strings.Builder
	log.WriteString("=== RUN   TestBehaviours\n=== RUN   TestBehaviours/tcx\n")
	for i := range 5 {
		fmt.Fprintf(&log, "=== RUN   TestBehaviours/tcx/s%d\n    scenario.go:1: tcx not supported\n", i)
	}
	log.WriteString("--- FAIL: TestBehaviours (1.00s)\n    --- FAIL: TestBehaviours/tcx (1.00s)\n")
	for i := range 5 {
		fmt.Fprintf(&log, "        --- FAIL: TestBehaviours/tcx/s%d (0.10s)\n", i)
	}
	log.WriteString("FAIL\n") // test2json holds nested results until the next line
	writeKernel(t, dir, "bullseye", map[string]string{"exit": "1\n", "test.json": toJSON(t, log.String())})
	m, err := load(dir)
	if err != nil {
		t.Fatal(err)
	}
	notes := m.notes()
	want := []string{
		"5.10 TestBehaviours/tcx/s0: FAIL: scenario.go:1: tcx not supported",
		"5.10 TestBehaviours/tcx/s1: FAIL: scenario.go:1: tcx not supported",
		"5.10 TestBehaviours/tcx/s2: FAIL: scenario.go:1: tcx not supported",
		"5.10 TestBehaviours/tcx: 2 more not passed (see bullseye/test.log)",
	}
	if strings.Join(notes, "\n") != strings.Join(want, "\n") {
		t.Errorf("notes:\n%s\nwant:\n%s", strings.Join(notes, "\n"), strings.Join(want, "\n"))
	}
}

func TestReportAllPass(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "kernels.tsv"), []byte("trixie\t6.12\tverifier\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	writeKernel(t, dir, "trixie", map[string]string{
		"vm":        "kvm\n",
		"exit":      "0\n",
		"test.json": toJSON(t, "=== RUN   TestA\n--- PASS: TestA (0.01s)\nPASS\n"),
	})
	m, err := load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !m.ok() {
		t.Errorf("all-pass matrix reported a failure: %+v", m.Kernels[0])
	}
	// A binary that exited non-zero with every test passing (a panic after
	// the last test, a leak check in TestMain) still fails the matrix.
	writeKernel(t, dir, "trixie", map[string]string{"exit": "2\n"})
	if m, err = load(dir); err != nil || m.ok() {
		t.Errorf("non-zero exit reported ok (err %v)", err)
	}
}
