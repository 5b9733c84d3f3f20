//go:build linux

package kubee2e

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/fastpath"
	"github.com/ambpf/ambpf/pkg/podwatch"
)

// TestFastPathAnnotation: with the agent's fast path on (default
// enabled), the pod watcher carries each pod's ambpf.io/fastpath
// annotation into its enrolment: a running pod annotated disabled is
// enrolled (found through /proc, with its cgroup) without the fast path,
// its neighbour with it; changing the annotations of the running pods
// attaches and detaches it.
func TestFastPathAnnotation(t *testing.T) {
	if err := fastpath.Supported(); err != nil {
		t.Skipf("kernel without the fast path: %v", err)
	}
	c := newCluster(t)
	c.stopAgent()
	c.env.Config.FastPath = fastpath.ToProxy
	c.startAgent()
	ns := c.namespace("fastpath", nil)
	a := c.startPod(ns, "a", podOpts{})
	d := c.startPod(ns, "d", podOpts{annotations: map[string]string{podwatch.FastPathAnnotation: agentapi.FastPathDisabled}})
	// Labelled once the pods run: enrolled through /proc, with the
	// cgroups of their pause processes.
	c.setNamespaceLabel(ns, podwatch.DataplaneAmbient)
	for _, p := range []*kpod{a, d} {
		c.waitAnnotation(p, podwatch.RedirectionEnabled)
	}
	c.waitFastPath(a, true)
	c.waitFastPath(d, false)

	c.setPodAnnotation(d, podwatch.FastPathAnnotation, agentapi.FastPathEnabled)
	c.waitFastPath(d, true)
	c.setPodAnnotation(a, podwatch.FastPathAnnotation, agentapi.FastPathDisabled)
	c.waitFastPath(a, false)
}

// waitFastPath waits until the agent reports p's fast path attached, or
// (attached false) off by the pod's choice.
func (c *cluster) waitFastPath(p *kpod, attached bool) {
	c.t.Helper()
	agenttest.WaitFor(c.t, waitLong, fmt.Sprintf("%s fast path attached %v", p, attached), func() bool {
		ps, err := c.env.Client.Pod(context.Background(), p.uid)
		if err != nil || ps.FastPath == nil {
			return false
		}
		fp := ps.FastPath
		if attached {
			return fp.Attached && fp.Error == ""
		}
		return !fp.Attached && fp.Error == "" && fp.Disabled != ""
	})
}

// setPodAnnotation sets annotation name of p to value.
func (c *cluster) setPodAnnotation(p *kpod, name, value string) {
	c.t.Helper()
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{name: value}}})
	if _, err := c.client.CoreV1().Pods(p.namespace).Patch(context.Background(), p.name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		c.t.Fatalf("annotate %s %s=%s: %v", p, name, value, err)
	}
}
