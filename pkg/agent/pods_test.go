//go:build linux

package agent

import (
	"errors"
	"testing"

	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/zds"
)

// TestReusePortFor: the ZDS ambpf_reuseport follows the datapath's
// probe, both ways (TestReusePortSentOverZDS sees only this kernel's
// answer), and a probe that failed, which the datapath reports as
// unsupported, is refused: never unknown, which would leave the proxy to
// guess from the version.
func TestReusePortFor(t *testing.T) {
	for _, c := range []struct {
		f    datapath.Features
		want zds.ReusePort
	}{
		{datapath.Features{ReusePortAssign: true}, zds.ReusePortAllowed},
		{datapath.Features{ReusePortAssign: false}, zds.ReusePortRefused},
		{datapath.Features{ReusePortErr: errors.New("no SYN seen")}, zds.ReusePortRefused},
	} {
		if got := reusePortFor(c.f); got != c.want {
			t.Errorf("features %+v: %s, want %s", c.f, got, c.want)
		}
	}
}
