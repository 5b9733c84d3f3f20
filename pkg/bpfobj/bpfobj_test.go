//go:build linux

package bpfobj

import (
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

func TestTag(t *testing.T) {
	a, b := Tag([]byte("build 1")), Tag([]byte("build 2"))
	if a == b || a != Tag([]byte("build 1")) || a == ([8]byte{}) {
		t.Errorf("tags %x %x: want distinct, stable, non-zero", a, b)
	}
}

// TestLoadVerifierError loads a program the verifier must reject (it
// returns without setting R0) and checks the error names the family and
// carries the verifier's log.
func TestLoadVerifierError(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads BPF programs")
	}
	spec := &ebpf.CollectionSpec{Programs: map[string]*ebpf.ProgramSpec{
		"bad": {Type: ebpf.SchedCLS, License: "MIT", Instructions: asm.Instructions{asm.Return()}},
	}}
	var objs struct {
		Bad *ebpf.Program `ebpf:"bad"`
	}
	err := Load(spec, &objs, nil, "test")
	if err == nil {
		objs.Bad.Close()
		t.Fatal("verifier accepted a program that leaves R0 unset")
	}
	if msg := err.Error(); !strings.Contains(msg, "verifier rejected the test programs") || !strings.Contains(msg, "R0") {
		t.Errorf("error %q lacks the family or the verifier log", msg)
	}
}
