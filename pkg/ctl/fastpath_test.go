package ctl

import (
	"bytes"
	"strings"
	"testing"

	"github.com/ambpf/ambpf/pkg/dpstate"
)

// TestExplainFastPath: inspect tells a pod without the fast path by
// choice (its annotation, the node's default) from one that failed to get
// it, and shows an attached pod's counters.
func TestExplainFastPath(t *testing.T) {
	for _, c := range []struct {
		fp   *dpstate.FastPath
		want []string
		not  string
	}{
		{nil, []string{"off (agent --fastpath)"}, "NOT"},
		{&dpstate.FastPath{Mode: "to-proxy", Disabled: "the pod's ambpf.io/fastpath annotation says disabled"},
			[]string{"mode to-proxy, off for this pod: the pod's ambpf.io/fastpath annotation says disabled"}, "NOT"},
		{&dpstate.FastPath{Mode: "both", Error: "the pod has no cgroup"},
			[]string{"NOT attached", "(the pod has no cgroup)"}, "off for this pod"},
		{&dpstate.FastPath{Mode: "both", Attached: true, Index: 3, Counters: dpstate.FastPathCounters{BytesToProxy: 1048576}},
			[]string{"attached (fastpath/fp_stats[3])", "bytes_to_proxy  1048576"}, "NOT"},
	} {
		var b bytes.Buffer
		explainFastPath(&b, c.fp)
		for _, w := range c.want {
			if !strings.Contains(b.String(), w) {
				t.Errorf("%+v: %q lacks %q", c.fp, b.String(), w)
			}
		}
		if strings.Contains(b.String(), c.not) {
			t.Errorf("%+v: %q has %q", c.fp, b.String(), c.not)
		}
	}
}
