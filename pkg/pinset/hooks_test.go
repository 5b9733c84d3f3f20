//go:build linux

package pinset

import (
	"path/filepath"
	"reflect"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ambpf/ambpf/pkg/tcattach"
)

// TestTableHooks: a table's hooks come out in table order, on lo where
// the row says so, named for their program, running what Programs finds
// by name; its pins are named from the same rows.
func TestTableHooks(t *testing.T) {
	tab := Table{Hooks: []Hook{
		{Program: "in", Dir: tcattach.Ingress, LinkPin: "link_in"},
		{Program: "lo_out", Dir: tcattach.Egress, Loopback: true, LinkPin: "link_lo"},
	}}
	a, b := &ebpf.Program{}, &ebpf.Program{}
	got := tab.TC(7, ByName(map[string]*ebpf.Program{"in": a, "lo_out": b}))
	want := []tcattach.Hook{
		{Ifindex: 7, Dir: tcattach.Ingress, Program: a, Name: "ambpf_in"},
		{Ifindex: LoopbackIfindex, Dir: tcattach.Egress, Program: b, Name: "ambpf_lo_out"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("TC = %+v, want %+v", got, want)
	}
	if got := tab.TC(7, nil); got[0].Program != nil || got[1].Name != "ambpf_lo_out" {
		t.Errorf("TC without programs = %+v", got)
	}
	if got, want := tab.LinkPins("/d"), []string{filepath.Join("/d", "link_in"), filepath.Join("/d", "link_lo")}; !reflect.DeepEqual(got, want) {
		t.Errorf("LinkPins = %v, want %v", got, want)
	}
	if got := tab.Hooks[1].ProgPin(); got != "prog_lo_out" {
		t.Errorf("ProgPin = %q", got)
	}
}
