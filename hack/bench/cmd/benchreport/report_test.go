package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const sampleOutput = `goos: linux
goarch: amd64
pkg: github.com/ambpf/ambpf/hack/bench
BenchmarkConnect/out/none    	    9438	    121767 ns/op	      8212 conn/s	       120.6 cpu-us/conn
BenchmarkConnect/out/iptables-2         	    3478	    371929 ns/op	      2689 conn/s	       368.3 cpu-us/conn
BenchmarkConnect/out/ebpf             	    3367	    356415 ns/op	      2806 conn/s	       337.6 cpu-us/conn
BenchmarkEnroll/iptables              	      14	 103457405 ns/op	     26068 enroll-us
BenchmarkEnroll/ebpf                  	       8	 145220763 ns/op	     13034 enroll-us
PASS
`

func TestParse(t *testing.T) {
	rs, err := parse(strings.NewReader(sampleOutput))
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 5 {
		t.Fatalf("got %d results, want 5: %+v", len(rs), rs)
	}
	r := rs[1]
	if r.group != "Connect/out" || r.mech != "iptables" {
		t.Errorf("got group %q mech %q, want Connect/out iptables (procs suffix stripped)", r.group, r.mech)
	}
	if r.metrics["ns/op"] != 371929 || r.metrics["cpu-us/conn"] != 368.3 {
		t.Errorf("metrics %v", r.metrics)
	}
	if _, err := parse(strings.NewReader("BenchmarkX/none 10 5 ns/op 3\n")); err == nil {
		t.Error("odd value/unit fields parsed without error")
	}
}

func TestMedianSpread(t *testing.T) {
	if m := median([]float64{5, 1, 3}); m != 3 {
		t.Errorf("median odd = %v", m)
	}
	if m := median([]float64{4, 1, 3, 2}); m != 2.5 {
		t.Errorf("median even = %v", m)
	}
	if s := spread([]float64{90, 100, 110}); s != 10 {
		t.Errorf("spread = %v, want 10", s)
	}
}

func TestRenderRatios(t *testing.T) {
	s := samples{}
	for range 3 {
		rs, err := parse(strings.NewReader(sampleOutput))
		if err != nil {
			t.Fatal(err)
		}
		s.add(rs)
	}
	var b strings.Builder
	renderTables(&b, s)
	out := b.String()
	for _, want := range []string{
		"| metric | none | iptables | ebpf | iptables / none | ebpf / none | ebpf / iptables |",
		"| 8212 ±0% | 2689 ±0% | 2806 ±0% | 0.33× | 0.34× | 1.04× |", // conn/s
		"| `us/op` mean time per op, µs | 121.8 ±0% |",               // ns/op shown in µs
		"| 26068 ±0% | 13034 ±0% | 0.50× |",                          // enroll-us, ebpf / iptables only
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Index(out, "Connection setup, outbound") > strings.Index(out, "Enrolment") {
		t.Error("groups not in display order")
	}
}

func TestUpdateDoc(t *testing.T) {
	path := filepath.Join(t.TempDir(), "B.md")
	if err := updateDoc(path, beginMarker, endMarker, "first\n"); err != nil {
		t.Fatal(err)
	}
	// Hand-written prose around the generated block must survive.
	b, _ := os.ReadFile(path)
	doc := "intro\n\n" + string(b) + "\ncaveats\n"
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := updateDoc(path, beginMarker, endMarker, "second\n"); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(path)
	got := string(b)
	for _, want := range []string{"intro\n", "second\n", "caveats\n"} {
		if !strings.Contains(got, want) {
			t.Errorf("doc lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "first") || strings.Count(got, beginMarker) != 1 {
		t.Errorf("generated block not replaced exactly once:\n%s", got)
	}
	// The mesh suite's section is separate: writing it keeps the other.
	mesh := suites["mesh"]
	if err := updateDoc(path, mesh.begin, mesh.end, "mesh rows\n"); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(path)
	got = string(b)
	if !strings.Contains(got, "second\n") || !strings.Contains(got, "mesh rows\n") || strings.Count(got, mesh.begin) != 1 {
		t.Errorf("mesh section not added beside the capture one:\n%s", got)
	}
}

func TestRotate(t *testing.T) {
	if got := strings.Join(rotate(suites["capture"].mechanisms, 4), ","); got != "iptables,ebpf,none" {
		t.Errorf("rotate by 4 = %s", got)
	}
}
