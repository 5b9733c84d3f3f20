//go:build linux

package nodee2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ambpf/ambpf/hack/node"
	"github.com/ambpf/ambpf/pkg/cgroup"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/promtext"
)

const appManifest = `apiVersion: apps/v1
kind: Deployment
metadata: {name: %[1]s, namespace: %[2]s}
spec:
  replicas: %[3]d
  selector: {matchLabels: {app: %[1]s}}
  template:
    metadata: {labels: {app: %[1]s}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
        - name: app
          image: localhost/ambpf-testapp:1
          imagePullPolicy: Never
          args: [serve, --http, ":8080", --tcp, ":9090"]
          readinessProbe: {httpGet: {path: /healthz, port: 8080}, periodSeconds: 2}
          livenessProbe: {tcpSocket: {port: 9090}, periodSeconds: 2, failureThreshold: 3}
`

// deploy creates namespace ns (with labels) and a Deployment of the test
// app with replicas pods, and returns them once Ready.
func (e *env) deploy(ns string, labels map[string]string, name string, replicas int) []pod {
	e.t.Helper()
	e.createDeployment(ns, labels, name, replicas)
	return e.readyPods(ns, "app="+name, replicas)
}

// createDeployment creates namespace ns (with labels) and a Deployment of
// the test app with replicas pods.
func (e *env) createDeployment(ns string, labels map[string]string, name string, replicas int) {
	e.t.Helper()
	var l []string
	for k, v := range labels {
		l = append(l, fmt.Sprintf("%s: %q", k, v))
	}
	e.apply(fmt.Sprintf("apiVersion: v1\nkind: Namespace\nmetadata: {name: %s, labels: {%s}}\n", ns, strings.Join(l, ", ")))
	e.apply(fmt.Sprintf(appManifest, name, ns, replicas))
}

// noProxyNode is a node name no node has: the proxy DaemonSet's
// nodeSelector set to it schedules the proxy nowhere.
const noProxyNode = "nowhere"

// waitDaemonSets waits until both DaemonSets run their updated pod Ready
// (helm --wait accepts a DaemonSet with maxUnavailable pods not ready:
// on one node, none).
func (e *env) waitDaemonSets() {
	e.t.Helper()
	for _, ds := range []string{"ambpf-agent", "ambpf-proxy"} {
		e.waitDaemonSet(ds, "1/1/1")
	}
}

// waitDaemonSet waits until ds's ready/updated/desired pods are want.
func (e *env) waitDaemonSet(ds, want string) {
	e.t.Helper()
	e.eventually("DaemonSet "+ds+" "+want, func() error {
		out := e.kubectl("get", "ds", "-n", releaseNS, ds, "-o", "jsonpath={.status.numberReady}/{.status.updatedNumberScheduled}/{.status.desiredNumberScheduled}")
		// Zero counts are left out of the status.
		f := strings.Split(out, "/")
		for i := range f {
			if f[i] == "" {
				f[i] = "0"
			}
		}
		if out = strings.Join(f, "/"); out != want {
			return fmt.Errorf("ready/updated/desired %s", out)
		}
		return nil
	})
}

func (e *env) annotation(p pod) string {
	return e.kubectl("get", "pod", "-n", p.ns, p.name, "-o", `jsonpath={.metadata.annotations.ambient\.istio\.io/redirection}`)
}

// podPinned reports whether the agent pinned anything for the pod.
func (e *env) podPinned(uid string) bool {
	_, err := os.Stat(filepath.Join(e.n.BPFRoot, "ambpf", "pods", uid))
	return err == nil
}

// markGuarded reports whether a program named guard_mark is attached to
// the pod's cgroup2 directory or its container's.
func (e *env) markGuarded(p pod) bool {
	e.t.Helper()
	cg, err := cgroup.OfProcess(p.pid)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, dir := range []string{cg, filepath.Dir(cg)} {
		out, err := exec.Command("bpftool", "cgroup", "show", dir).CombinedOutput()
		if err != nil {
			e.t.Fatalf("bpftool cgroup show %s: %v\n%s", dir, err, out)
		}
		if strings.Contains(string(out), "guard_mark") {
			return true
		}
	}
	return false
}

// inPodRules returns the policy rules the agent adds in a pod (the proxy
// mark's lookup).
func (e *env) inPodRules(p pod) []string {
	var rules []string
	for _, l := range strings.Split(e.nsRun(p, "ip", "rule", "show"), "\n") {
		if strings.Contains(l, "fwmark") {
			rules = append(rules, strings.TrimSpace(l))
		}
	}
	return rules
}

// get fetches http://ip:8080/ from inside p; ok=false when refused.
func (e *env) get(from pod, ip string) (string, bool) {
	out, code := e.exec(from, "get", "http://"+ip+":8080/")
	return out, code == 0
}

// TestRealNode installs the chart with helm on a real kubelet + containerd
// node and checks, through kubectl and the wire, what a user would: pods
// the runtime creates in an ambient namespace are enrolled and talk HBONE
// with their real IPs, a pod outside is untouched, probes pass, the mark
// guard holds, STRICT and a DENY AuthorizationPolicy refuse, and helm
// uninstall leaves working pods and no state behind.
func TestRealNode(t *testing.T) {
	e := startNode(t)

	e.kubectl("create", "namespace", caNS)
	e.followCA()
	// First with the proxy DaemonSet scheduled nowhere: the agent runs,
	// no proxy connects to it.
	e.helm("install", append(e.chartValues(), "--set-string", "proxy.nodeSelector.ambpf-e2e="+noProxyNode)...)
	e.waitDaemonSet("ambpf-agent", "1/1/1")
	e.waitDaemonSet("ambpf-proxy", "0/0/0")
	conflist, err := os.ReadFile(e.n.ConflistPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(conflist), `"ambpf-cni"`) {
		t.Fatalf("ambpf-cni not chained into %s:\n%s", e.n.ConflistPath, conflist)
	}

	// Created by the Deployment controller, scheduled, started by
	// kubelet -> containerd -> bridge + ambpf-cni; Ready means kubelet's
	// httpGet and tcpSocket probes passed.
	e.createDeployment("mesh", map[string]string{"istio.io/dataplane-mode": "ambient"}, "app", 2)

	// While no proxy is connected the CNI ADD fails: kubelet tears the
	// sandbox down and retries it, and the pods never go Ready with
	// their traffic held.
	t.Run("CNI ADD fails while no proxy is connected", func(t *testing.T) {
		e.eventually("sandbox creation refused for want of a proxy", func() error {
			ev := e.kubectl("get", "events", "-n", "mesh", "--field-selector", "reason=FailedCreatePodSandBox",
				"-o", "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}")
			if !strings.Contains(ev, "no proxy is connected to the agent") {
				return fmt.Errorf("no FailedCreatePodSandBox event naming the missing proxy yet; events: %q", ev)
			}
			return nil
		})
		out := e.kubectl("get", "pods", "-n", "mesh", "-l", "app=app", "-o",
			`jsonpath={range .items[*]}{.metadata.uid}|{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}`)
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			f := strings.Split(l, "|")
			if len(f) != 2 {
				continue
			}
			if f[1] == "True" {
				t.Errorf("pod %s went Ready with no proxy: %q", f[0], l)
			}
			if e.podPinned(f[0]) {
				t.Errorf("pod %s is pinned although its ADD failed", f[0])
			}
		}
		if a := e.kubectl("get", "pods", "-n", "mesh", "-l", "app=app", "-o", `jsonpath={.items[*].metadata.annotations.ambient\.istio\.io/redirection}`); a != "" {
			t.Errorf("redirection annotations while no proxy serves: %q", a)
		}
	})

	// The proxy scheduled again: kubelet's next sandbox attempt enrols
	// the pods and they go Ready.
	start := time.Now()
	e.helm("upgrade", e.chartValues()...)
	e.waitDaemonSets()
	apps := e.readyPods("mesh", "app=app", 2)
	t.Logf("pods Ready %v after the proxy was scheduled", time.Since(start).Round(time.Second))
	a, b := apps[0], apps[1]
	outside := e.deploy("plain", nil, "plain", 1)[0]

	t.Run("enrolled", func(t *testing.T) {
		for _, p := range apps {
			if got := e.annotation(p); got != "enabled" {
				t.Errorf("%s: ambient.istio.io/redirection=%q, want enabled", p.name, got)
			}
			if !e.podPinned(p.uid) {
				t.Errorf("%s: no pins under %s", p.name, e.n.BPFRoot)
			}
			if len(e.inPodRules(p)) == 0 {
				t.Errorf("%s: no in-pod mark rule", p.name)
			}
			// Set by ambpf-cni on the host: the non-privileged agent
			// cannot write /proc/sys (docs/KUBERNETES.md).
			if v := strings.TrimSpace(e.nsRun(p, "cat", "/proc/sys/"+meshconst.MigrateReqSysctl)); v != "1" {
				t.Errorf("%s: tcp_migrate_req=%s, want 1 for the proxy upgrade's hand-over", p.name, v)
			}
		}
	})

	// The proxies got their pods' certificates from the CA by CSR (they
	// hold no CA key: the enrolled pods above talk only after that); the
	// key is in the CA's namespace alone.
	t.Run("no CA key in the agents' and proxies' namespace", func(t *testing.T) {
		keys := func(ns string) []string {
			var list struct {
				Items []struct {
					Metadata struct{ Name string } `json:"metadata"`
					Data     map[string]string     `json:"data"`
				} `json:"items"`
			}
			if err := json.Unmarshal([]byte(e.kubectl("get", "secrets", "-n", ns, "-o", "json")), &list); err != nil {
				t.Fatalf("kubectl get secrets -n %s: %v", ns, err)
			}
			var out []string
			for _, s := range list.Items {
				for k := range s.Data {
					if strings.HasSuffix(k, ".key") {
						out = append(out, s.Metadata.Name+"/"+k)
					}
				}
			}
			return out
		}
		if k := keys(releaseNS); len(k) > 0 {
			t.Errorf("private keys in %s: %v", releaseNS, k)
		}
		if k := keys(caNS); len(k) == 0 {
			t.Errorf("no CA key in %s", caNS)
		}
	})

	t.Run("unlabelled namespace untouched", func(t *testing.T) {
		if got := e.annotation(outside); got != "" {
			t.Errorf("%s: annotation %q", outside.name, got)
		}
		if e.podPinned(outside.uid) {
			t.Errorf("%s: pinned", outside.name)
		}
		if r := e.inPodRules(outside); len(r) > 0 {
			t.Errorf("%s: in-pod rules %v", outside.name, r)
		}
		if e.markGuarded(outside) {
			t.Errorf("%s: mark guard attached", outside.name)
		}
	})

	t.Run("HBONE on the wire with the real peer IP", func(t *testing.T) {
		c := e.startCapture(a, b)
		out, ok := e.get(a, b.ip)
		lines := c.stop(t)
		if !ok {
			t.Fatalf("%s -> %s: %s", a.name, b.ip, out)
		}
		if want := "peer=" + a.ip + " "; !strings.HasPrefix(out, want) {
			t.Errorf("the app saw %q, want %q...", out, want)
		}
		var tunnel, plain int
		for _, l := range lines {
			if !strings.Contains(l, " IP ") || !strings.Contains(l, " "+a.ip+".") || !strings.Contains(l, " "+b.ip+".") {
				continue
			}
			if strings.Contains(l, ".15008 ") || strings.Contains(l, ".15008:") {
				tunnel++
			} else {
				plain++
				t.Errorf("pod-to-pod packet not to/from 15008: %s", l)
			}
		}
		if tunnel == 0 {
			t.Errorf("no %s <-> %s:15008 packets on the bridge ports; capture:\n%s", a.ip, b.ip, strings.Join(lines[:min(len(lines), 40)], "\n"))
		}
		for _, l := range lines {
			if strings.Contains(l, "peer="+a.ip) || strings.Contains(l, "GET / HTTP") {
				t.Errorf("plaintext HTTP on the bridge: %s", l)
			}
		}
		t.Logf("bridge ports: %d HBONE packets between the pods, %d other", tunnel, plain)
	})

	// The proxy's Prometheus endpoint (the chart's metrics port) counts
	// the app traffic above in Istio's istio_tcp_* series, with both
	// ends' workload labels, as the destination and as the source.
	t.Run("proxy metrics for the app traffic", func(t *testing.T) {
		ip := e.kubectl("get", "pods", "-n", releaseNS, "-l", "app.kubernetes.io/component=proxy", "-o", "jsonpath={.items[0].status.podIP}")
		url := "http://" + net.JoinHostPort(ip, "15020") + "/stats/prometheus"
		e.eventually("istio_tcp_* series for mesh -> mesh at "+url, func() error {
			c := http.Client{Timeout: 5 * time.Second}
			resp, err := c.Get(url)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				return err
			}
			fams, err := promtext.Parse(string(body))
			if err != nil {
				return err
			}
			for _, series := range []string{"istio_tcp_connections_opened_total", "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total"} {
				for _, reporter := range []string{"source", "destination"} {
					m := promtext.Find(fams[series], map[string]string{"reporter": reporter,
						"source_workload_namespace": "mesh", "destination_workload_namespace": "mesh"})
					if m == nil || promtext.Value(m) <= 0 {
						return fmt.Errorf("no non-zero %s{reporter=%q} between mesh pods in:\n%s", series, reporter, tail(string(body), 30))
					}
				}
			}
			return nil
		})
	})

	t.Run("mark guard in runtime-created pods", func(t *testing.T) {
		if !e.markGuarded(a) {
			t.Errorf("%s: no guard_mark on its cgroup", a.name)
		}
		out, code := e.exec(a, "mark", "0x539")
		if code != 3 || out != "EPERM" {
			t.Errorf("SO_MARK 0x539 in %s: %q (exit %d), want EPERM", a.name, out, code)
		}
		// Outside the mesh the same call is allowed (root with
		// CAP_NET_RAW in the runtime's default set): the refusal above
		// is the guard's.
		if out, code := e.exec(outside, "mark", "0x539"); code != 0 {
			t.Errorf("SO_MARK 0x539 in unenrolled %s: %q (exit %d), want ok", outside.name, out, code)
		}
	})

	t.Run("AuthorizationPolicy DENY", func(t *testing.T) {
		e.apply(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-mesh, namespace: mesh}
spec:
  action: DENY
  selector: {matchLabels: {app: app}}
  rules:
    - from: [{source: {namespaces: [mesh]}}]
`)
		e.eventually("DENY refuses "+a.name+" -> "+b.name, func() error {
			if out, ok := e.get(a, b.ip); ok {
				return fmt.Errorf("still allowed: %s", out)
			}
			return nil
		})
		e.kubectl("delete", "authorizationpolicy", "-n", "mesh", "deny-mesh")
		e.eventually("allowed again after the policy is deleted", func() error {
			if out, ok := e.get(a, b.ip); !ok {
				return fmt.Errorf("refused: %s", out)
			}
			return nil
		})
	})

	t.Run("helm upgrade to a new image tag under traffic", func(t *testing.T) {
		const tag = "0.1.0-e2e-upgrade"
		e.importImageTag(tag)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		// A new connection every 100 ms from a to b, through the mesh,
		// for as long as kubectl exec holds its stdin open.
		cmd := e.n.Command(ctx, "kubectl", "exec", "-i", "-n", a.ns, a.name, "--", "testapp", "loop", "http://"+b.ip+":8080/", "stdin", "100ms")
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		ok, failed := 0, 0
		var fails []string
		done := make(chan struct{})
		go func() {
			defer close(done)
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				mu.Lock()
				switch l := sc.Text(); {
				case l == "ok":
					ok++
				case strings.HasPrefix(l, "fail"):
					failed++
					if len(fails) < 5 {
						fails = append(fails, l)
					}
				}
				mu.Unlock()
			}
		}()
		counts := func() (int, int) { mu.Lock(); defer mu.Unlock(); return ok, failed }
		e.eventually("traffic flowing before the upgrade", func() error {
			if o, _ := counts(); o < 10 {
				return fmt.Errorf("%d requests ok", o)
			}
			return nil
		})
		start := time.Now()
		e.helm("upgrade", e.chartValues("image.tag="+tag)...)
		e.waitDaemonSets()
		// The rollout is done when the new pods are ready; the proxy's
		// surge leaves the old pod draining (terminating) a little
		// longer, so wait for it to go rather than look once.
		for _, ds := range []string{"ambpf-agent", "ambpf-proxy"} {
			e.eventually(ds+" runs only the new image", func() error {
				img := e.kubectl("get", "pods", "-n", releaseNS, "-l", "app.kubernetes.io/component="+strings.TrimPrefix(ds, "ambpf-"), "-o", "jsonpath={.items[*].spec.containers[0].image}")
				if img != node.ChartImageRepository+":"+tag {
					return fmt.Errorf("%s runs %q, want tag %s", ds, img, tag)
				}
				return nil
			})
		}
		rolled := time.Since(start)
		o0, _ := counts()
		e.eventually("traffic flowing after the upgrade", func() error {
			if o, _ := counts(); o < o0+20 {
				return fmt.Errorf("%d requests ok since the rollout", o-o0)
			}
			return nil
		})
		stdin.Close()
		<-done
		cmd.Wait()
		o, f := counts()
		t.Logf("helm upgrade to %s under traffic: rollout %v, %d requests ok, %d failed (first: %v)", tag, rolled.Round(time.Millisecond), o, f, fails)
		// The proxy DaemonSet surges: the new proxy takes every pod over
		// ZDS before the old one stops, so no connection may fail.
		if f > 0 {
			t.Errorf("%d of %d connections failed during the upgrade, want 0", f, o+f)
		}
	})

	t.Run("STRICT refuses plaintext from outside the mesh", func(t *testing.T) {
		if out, ok := e.get(outside, b.ip); !ok {
			t.Fatalf("PERMISSIVE: %s -> %s refused: %s", outside.name, b.name, out)
		}
		e.helm("upgrade", e.chartValues("mtlsMode=STRICT")...)
		e.waitDaemonSets()
		e.eventually("STRICT refuses "+outside.name, func() error {
			if out, ok := e.get(outside, b.ip); ok {
				return fmt.Errorf("plaintext still accepted: %s", out)
			}
			return nil
		})
		e.eventually("mesh pods still connect", func() error {
			if out, ok := e.get(a, b.ip); !ok {
				return fmt.Errorf("refused: %s", out)
			}
			return nil
		})
	})

	t.Run("helm uninstall", func(t *testing.T) {
		veths := map[string]string{}
		for _, p := range apps {
			veths[p.name] = e.hostVeth(p)
		}
		e.helm("uninstall")
		e.eventually("ambpf-cni unchained", func() error {
			b, err := os.ReadFile(e.n.ConflistPath)
			if err != nil {
				return err
			}
			if strings.Contains(string(b), "ambpf-cni") {
				return fmt.Errorf("still chained:\n%s", b)
			}
			return nil
		})
		e.eventually("the mesh's pods gone", func() error {
			if out := e.kubectl("get", "pods", "-n", releaseNS, "-o", "name"); out != "" {
				return fmt.Errorf("still running: %s", out)
			}
			return nil
		})
		// The agent saw its DaemonSet deleted: it unenrolled every pod
		// and removed the node's pins.
		// Under the agent's root (the chart's AMBPF_BPF_ROOT): bpffs
		// has files of its own (maps.debug, progs.debug).
		var pins []string
		filepath.WalkDir(filepath.Join(e.n.BPFRoot, "ambpf"), func(path string, d os.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				pins = append(pins, path)
			}
			return nil
		})
		if len(pins) > 0 {
			t.Errorf("pins left after helm uninstall: %v", pins)
		}
		for _, p := range apps {
			if r := e.inPodRules(p); len(r) > 0 {
				t.Errorf("%s: in-pod rules left: %v", p.name, r)
			}
			if e.markGuarded(p) {
				t.Errorf("%s: guard_mark still attached to its cgroup", p.name)
			}
			for where, out := range map[string]string{
				"in the pod":                        e.nsRun(p, "bpftool", "net", "show", "dev", "eth0") + e.nsRun(p, "tc", "qdisc", "show", "dev", "eth0"),
				"on its host veth " + veths[p.name]: e.hostRun("bpftool", "net", "show", "dev", veths[p.name]) + e.hostRun("tc", "qdisc", "show", "dev", veths[p.name]),
			} {
				if strings.Contains(out, " id ") || strings.Contains(out, "clsact") {
					t.Errorf("%s: programs or a clsact qdisc left %s:\n%s", p.name, where, out)
				}
			}
		}
		// The pods keep working, unenrolled: the app sees A's address,
		// and the connection is no longer tunnelled.
		c := e.startCapture(a, b)
		out, ok := e.get(a, b.ip)
		lines := c.stop(t)
		if !ok || !strings.HasPrefix(out, "peer="+a.ip+" ") {
			t.Fatalf("%s -> %s after the uninstall: %q (ok %v)", a.name, b.ip, out, ok)
		}
		for _, l := range lines {
			if strings.Contains(l, ".15008") {
				t.Errorf("HBONE after the uninstall: %s", l)
				break
			}
		}
		if a := e.annotation(a); a != "" {
			t.Logf("%s keeps its annotation ambient.istio.io/redirection=%q (the agent's credentials are gone with the release)", apps[0].name, a)
		}
	})
}

// hostVeth returns the name of p's host-side veth: eth0's peer index
// (eth0@ifN) in the node's namespace.
func (e *env) hostVeth(p pod) string {
	e.t.Helper()
	out := e.nsRun(p, "ip", "-o", "link", "show", "dev", "eth0")
	_, rest, ok := strings.Cut(out, "eth0@if")
	idx, _, _ := strings.Cut(rest, ":")
	if !ok || idx == "" {
		e.t.Fatalf("%s: no veth peer in %q", p.name, out)
	}
	for _, l := range strings.Split(e.hostRun("ip", "-o", "link", "show"), "\n") {
		if n, rest, ok := strings.Cut(l, ": "); ok && n == idx {
			name, _, _ := strings.Cut(rest, "@")
			name, _, _ = strings.Cut(name, ":")
			return name
		}
	}
	e.t.Fatalf("%s: host ifindex %s not found", p.name, idx)
	return ""
}

// hostRun runs a command on the host and returns its output.
func (e *env) hostRun(name string, args ...string) string {
	e.t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		e.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}
