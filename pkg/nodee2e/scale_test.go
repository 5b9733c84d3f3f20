//go:build linux

package nodee2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// scaleEnv runs TestRealNodeMaxPods: it takes minutes on a 2-core
// machine (docs/KUBERNETES.md), so make e2e-node runs it only when asked
// (make e2e-node-scale sets it).
const scaleEnv = "AMBPF_E2E_NODE_SCALE"

// maxPods is kubelet's default max-pods, which the node keeps.
const maxPods = 110

// TestRealNodeMaxPods fills the node to kubelet's default max-pods: the
// chart's pods plus test-app pods in an ambient namespace, every one
// started by kubelet -> containerd -> CNI, enrolled (annotation enabled,
// pinned) and Ready. The agent container's memory cgroup (v1 here, kernel
// memory included: BPF maps are charged to the cgroup that creates them)
// must stay within the chart's limit; the figures are logged for
// docs/KUBERNETES.md.
func TestRealNodeMaxPods(t *testing.T) {
	if os.Getenv(enableEnv) == "1" && os.Getenv(scaleEnv) != "1" {
		t.Skipf("the %d-pod run takes minutes: it runs with %s=1 (make e2e-node-scale)", maxPods, scaleEnv)
	}
	e := startNode(t)
	e.kubectl("create", "namespace", caNS)
	e.followCA()
	e.helm("install", e.chartValues()...)
	e.waitDaemonSets()
	agentPod := e.readyPods(releaseNS, "app.kubernetes.io/component=agent", 1)[0]
	mem0 := e.memcg(agentPod.pid)
	limit := mem0.limit
	t.Logf("agent memory cgroup with no enrolled pod: %s", mem0)

	running := len(strings.Fields(e.kubectl("get", "pods", "-A", "-o", "name")))
	apps := maxPods - running
	start := time.Now()
	e.createDeployment("scale", map[string]string{"istio.io/dataplane-mode": "ambient"}, "app", apps)
	deadline := time.Now().Add(20 * time.Minute)
	for {
		out := e.kubectl("get", "pods", "-n", "scale", "-o",
			`jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}|{.metadata.annotations.ambient\.istio\.io/redirection}{"\n"}{end}`)
		ready, enabled := 0, 0
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			r, a, _ := strings.Cut(l, "|")
			if r == "True" {
				ready++
			}
			if a == "enabled" {
				enabled++
			}
		}
		if ready == apps && enabled == apps {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d pods Ready, %d enabled, after %v", ready, apps, enabled, time.Since(start).Round(time.Second))
		}
		time.Sleep(2 * time.Second)
	}
	took := time.Since(start)
	if n := len(strings.Fields(e.kubectl("get", "pods", "-A", "-o", "name"))); n != maxPods {
		t.Errorf("%d pods on the node, want %d", n, maxPods)
	}
	pinned, err := os.ReadDir(filepath.Join(e.n.BPFRoot, "ambpf", "pods"))
	if err != nil {
		t.Fatal(err)
	}
	if len(pinned) != apps {
		t.Errorf("%d pods pinned, want %d", len(pinned), apps)
	}
	mem := e.memcg(agentPod.pid)
	t.Logf("%d app pods (%d on the node) Ready and enrolled in %v; agent memory cgroup: %s; per enrolled pod: %.1f KiB (usage), %.1f KiB (kernel)",
		apps, maxPods, took.Round(time.Second), mem,
		float64(mem.usage-mem0.usage)/float64(apps)/1024, float64(mem.kmem-mem0.kmem)/float64(apps)/1024)
	if mem.max >= limit {
		t.Errorf("the agent's memory peaked at %d bytes, its limit is %d", mem.max, limit)
	}
	if fails := e.kubectl("get", "pods", "-n", releaseNS, "-l", "app.kubernetes.io/component=agent", "-o", "jsonpath={.items[0].status.containerStatuses[?(@.name==\"agent\")].restartCount}"); fails != "0" {
		t.Errorf("the agent restarted %s times (OOM?)", fails)
	}
}

// memory is a memory cgroup v1's figures, in bytes.
type memory struct{ usage, max, kmem, limit uint64 }

func (m memory) String() string {
	mib := func(v uint64) string { return fmt.Sprintf("%.1f MiB", float64(v)/(1<<20)) }
	return fmt.Sprintf("usage %s (peak %s, kernel %s), limit %s", mib(m.usage), mib(m.max), mib(m.kmem), mib(m.limit))
}

// memcg reads the memory cgroup (v1) of process pid.
func (e *env) memcg(pid int) memory {
	e.t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		e.t.Fatal(err)
	}
	var dir string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.SplitN(l, ":", 3)
		if len(f) == 3 && (f[1] == "memory" || strings.Contains(","+f[1]+",", ",memory,")) {
			dir = filepath.Join("/sys/fs/cgroup/memory", f[2])
		}
	}
	if dir == "" {
		e.t.Fatalf("process %d has no v1 memory cgroup:\n%s", pid, b)
	}
	read := func(name string) uint64 {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			e.t.Fatal(err)
		}
		v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		if err != nil {
			e.t.Fatal(err)
		}
		return v
	}
	return memory{usage: read("memory.usage_in_bytes"), max: read("memory.max_usage_in_bytes"),
		kmem: read("memory.kmem.usage_in_bytes"), limit: read("memory.limit_in_bytes")}
}
