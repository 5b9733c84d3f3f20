//go:build linux

package bpfobj

import (
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// TestProgramID: the one-call ID is the one cilium/ebpf's full info
// reports, for two programs (so a constant or the type field read as the
// ID would show), and a closed program is an error, not ID 0.
func TestProgramID(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads BPF programs")
	}
	var ids []ebpf.ProgramID
	for range 2 {
		p, err := newPass()
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		info, err := p.Info()
		if err != nil {
			t.Fatal(err)
		}
		want, _ := info.ID()
		got, err := ProgramID(p)
		if err != nil || got != want {
			t.Fatalf("ProgramID = %d, %v; want %d", got, err, want)
		}
		ids = append(ids, got)
	}
	if ids[0] == ids[1] {
		t.Fatalf("two programs, one ID %d", ids[0])
	}
	p, err := newPass()
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	if id, err := ProgramID(p); err == nil {
		t.Fatalf("ProgramID of a closed program = %d, want an error", id)
	}
}

// newPass loads a two-instruction TC program.
func newPass() (*ebpf.Program, error) {
	return ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.SchedCLS, License: "MIT",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
}
