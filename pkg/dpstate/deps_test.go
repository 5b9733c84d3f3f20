package dpstate_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestClientsLinkNoLoader: the CNI plugin, its installer and ambpfctl talk
// to the agent's API only; they must not link the BPF loader (cilium/ebpf
// and the embedded objects), which the API's types once dragged in. The
// CNI plugin runs on every pod start; ambpfctl reads pins by running
// ambpf-agent inspect-pins. The proxy probes the one kernel feature it
// needs itself (kernfeat), without the datapath.
func TestClientsLinkNoLoader(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("no go command to list the dependencies with: %v", err)
	}
	for _, cmd := range []string{"./cmd/ambpf-cni", "./cmd/ambpf-cni-install", "./cmd/ambpfctl", "./cmd/ambpf-proxy"} {
		c := exec.Command(goBin, "list", "-deps", cmd)
		c.Dir = "../.."
		out, err := c.CombinedOutput()
		if err != nil {
			t.Fatalf("go list -deps %s: %v\n%s", cmd, err, out)
		}
		for _, dep := range strings.Fields(string(out)) {
			if strings.HasPrefix(dep, "github.com/cilium/ebpf") || dep == "github.com/ambpf/ambpf/pkg/datapath" {
				t.Errorf("%s links %s", cmd, dep)
			}
		}
	}
}
