//go:build linux

package cniplugin_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/testproxy"
)

// The external tools the test runs, built by hack/tools.sh.
var cniTools = []string{"cnitool", "bridge", "host-local", "loopback"}

func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test's directory")
		}
		dir = parent
	}
}

// toolsDir returns the directory holding cnitool and the reference
// plugins: $AMBPF_TOOLS_DIR or <repo>/.cache/tools, built with
// hack/tools.sh when something is missing.
func toolsDir(t *testing.T, root string) string {
	t.Helper()
	dir := os.Getenv("AMBPF_TOOLS_DIR")
	if dir == "" {
		dir = filepath.Join(root, ".cache", "tools")
	}
	for _, tool := range cniTools {
		if _, err := os.Stat(filepath.Join(dir, tool)); err != nil {
			cmd := exec.Command(filepath.Join(root, "hack", "tools.sh"))
			cmd.Env = append(os.Environ(), "AMBPF_TOOLS_DIR="+dir)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("hack/tools.sh: %v\n%s", err, out)
			}
			break
		}
	}
	return dir
}

// buildPlugin builds ambpf-cni into a fresh directory.
func buildPlugin(t *testing.T, root string) string {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "ambpf-cni"), "./cmd/ambpf-cni")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/ambpf-cni: %v\n%s", err, out)
	}
	return dir
}

// podNetns creates an empty network namespace for the runtime's part.
func podNetns(t *testing.T) *nettest.Netns {
	t.Helper()
	name := "ambpf-cni-" + agenttest.RandomID()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	path := "/run/netns/" + name
	ns, err := netns.Open(path)
	if err != nil {
		exec.Command("ip", "netns", "del", name).Run()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ns.Close()
		exec.Command("ip", "netns", "del", name).Run()
	})
	return &nettest.Netns{Name: name, NSName: name, NSPath: path, NS: ns}
}

type cniRun struct {
	t       *testing.T
	node    *nettest.Netns
	tools   string
	env     []string
	netName string
}

// run runs cnitool inside the node namespace, where the bridge plugin
// builds its bridge.
func (c *cniRun) run(podArgs string, args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", c.node.NSName, filepath.Join(c.tools, "cnitool")}, args...)...)
	cmd.Env = append(append(os.Environ(), c.env...), "CNI_ARGS="+podArgs)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestCNItool drives ambpf-cni the way a container runtime does: cnitool
// runs a conflist of the reference bridge plugin (with host-local IPAM)
// followed by ambpf-cni, against a real agent and a stand-in proxy.
func TestCNItool(t *testing.T) {
	agenttest.RequireRoot(t)
	root := repoRoot(t)
	tools := toolsDir(t, root)
	plugins := buildPlugin(t, root)
	topo := nettest.NewTopology(t, 0)
	e := agenttest.NewEnv(t)
	running := e.Start(t)
	proxy := agenttest.NewProxy(t, e.Config.ZDSPath)
	proxy.Connect()

	id := agenttest.RandomID()
	netName := "ambpf-test-" + id
	confDir := t.TempDir()
	conflist := fmt.Sprintf(`{"cniVersion":"1.1.0","name":%q,"plugins":[
	  {"type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":false,
	   "ipam":{"type":"host-local","subnet":"10.89.0.0/24","dataDir":%q}},
	  {"type":"ambpf-cni","agent_socket":%q,"dns_capture":true}]}`, netName, t.TempDir(), e.Config.APISocket)
	// The runtime brings lo up with the loopback plugin, as its own network.
	loconf := fmt.Sprintf(`{"cniVersion":"1.1.0","name":"%s-lo","plugins":[{"type":"loopback"}]}`, netName)
	for name, conf := range map[string]string{netName: conflist, netName + "-lo": loconf} {
		if err := os.WriteFile(filepath.Join(confDir, name+".conflist"), []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// libcni caches results under /var/lib/cni/results/<network>-*.
	t.Cleanup(func() {
		m, _ := filepath.Glob("/var/lib/cni/results/" + netName + "-*")
		for _, f := range m {
			os.Remove(f)
		}
	})
	c := &cniRun{t: t, node: topo.Node, tools: tools, netName: netName,
		env: []string{"CNI_PATH=" + plugins + ":" + tools, "NETCONFPATH=" + confDir}}
	ctx := context.Background()

	pod := podNetns(t)
	uid := "uid-" + id
	podArgs := "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=" + uid

	if out, err := c.run(podArgs, "add", netName+"-lo", pod.NSPath); err != nil {
		t.Fatalf("cnitool add loopback: %v\n%s", err, out)
	}
	out, err := c.run(podArgs, "add", netName, pod.NSPath)
	if err != nil {
		t.Fatalf("cnitool add: %v\n%s", err, out)
	}
	var result struct {
		IPs []struct{ Address string } `json:"ips"`
	}
	if err := json.Unmarshal([]byte(out), &result); err != nil || len(result.IPs) == 0 {
		t.Fatalf("cnitool add printed no result with IPs (%v):\n%s", err, out)
	}
	podIP := netip.MustParsePrefix(result.IPs[0].Address).Addr()

	st, err := e.Client.Pod(ctx, uid)
	if err != nil {
		t.Fatalf("agent does not know the pod after ADD: %v", err)
	}
	if st.Name != "web-0" || st.Namespace != "shop" || st.ServiceAccount != "default" || !st.DNSCapture ||
		!slices.Contains(st.IPs, podIP) || st.Interface != "eth0" || st.Netns != pod.NSPath {
		t.Errorf("enrolled as %+v", st.PodState)
	}
	if st.Datapath == nil || !st.Datapath.Attached() {
		t.Fatalf("datapath not attached after ADD: %+v %s", st.Datapath, st.DatapathError)
	}
	agenttest.WaitFor(t, 10*time.Second, "proxy runs the pod", func() bool { return proxy.Pod(uid) != nil })

	// Traffic is captured: a connection from the node to the pod's app
	// reaches the proxy's inbound listener, then the app.
	app, err := nettest.StartApp(pod, "web-0", []uint16{nettest.AppPort}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	conn, err := topo.Node.Dial(dctx, "tcp", netip.AddrPortFrom(podIP, nettest.AppPort).String())
	cancel()
	if err != nil {
		t.Fatalf("dial the pod's app: %v", err)
	}
	conn.Close()
	if _, ok := proxy.Pod(uid).WaitFor(func(o testproxy.Observation) bool {
		return o.Listener == 15006 && o.OrigDst == netip.AddrPortFrom(podIP, nettest.AppPort)
	}, 3*time.Second); !ok {
		t.Fatalf("the proxy did not see the connection: %+v", proxy.Pod(uid).Observations())
	}

	// A DEL of the same pod in another sandbox's netns (kubelet removing
	// a failed or dead sandbox while a newer one runs) leaves the running
	// enrolment alone.
	other := podNetns(t)
	if out, err := c.run(podArgs, "del", netName, other.NSPath); err != nil {
		t.Fatalf("cnitool del of another sandbox: %v\n%s", err, out)
	}
	if st, err := e.Client.Pod(ctx, uid); err != nil || st.Datapath == nil || !st.Datapath.Attached() {
		t.Fatalf("a DEL in another netns unenrolled the pod: %+v %v", st, err)
	}

	if out, err := c.run(podArgs, "check", netName, pod.NSPath); err != nil {
		t.Errorf("cnitool check: %v\n%s", err, out)
	}
	if out, err := c.run(podArgs, "status", netName, pod.NSPath); err != nil {
		t.Errorf("cnitool status: %v\n%s", err, out)
	}

	if out, err := c.run(podArgs, "del", netName, pod.NSPath); err != nil {
		t.Fatalf("cnitool del: %v\n%s", err, out)
	}
	if pins := e.PinnedUIDs(t); len(pins) != 0 {
		t.Errorf("pins left after DEL: %v", pins)
	}
	if _, err := e.Client.Pod(ctx, uid); !agentapi.IsNotFound(err) {
		t.Errorf("agent still knows the pod after DEL: %v", err)
	}
	if !slices.Contains(proxy.Dels(), uid) {
		t.Errorf("the proxy got no del for %s", uid)
	}
	for _, args := range [][]string{{"ip", "rule"}, {"ip", "-6", "rule"}} {
		out, err := exec.Command("ip", append([]string{"-n", pod.NSName}, args[1:]...)...).CombinedOutput()
		if err != nil || strings.Contains(string(out), "lookup 100") {
			t.Errorf("pod routing after DEL (%v): %s", err, out)
		}
	}
	// CHECK now fails; DEL again is fine (already removed).
	if out, err := c.run(podArgs, "check", netName, pod.NSPath); err == nil {
		t.Errorf("cnitool check after DEL succeeded:\n%s", out)
	}
	if out, err := c.run(podArgs, "del", netName, pod.NSPath); err != nil {
		t.Errorf("second cnitool del: %v\n%s", err, out)
	}

	// Agent down: ADD fails with a clear message and nothing is attached.
	running.Stop(t)
	pod2 := podNetns(t)
	uid2 := "uid2-" + id
	if out, err := c.run("", "add", netName+"-lo", pod2.NSPath); err != nil {
		t.Fatalf("cnitool add loopback: %v\n%s", err, out)
	}
	out, err = c.run("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID="+uid2, "add", netName, pod2.NSPath)
	if err == nil {
		t.Fatalf("cnitool add with the agent down succeeded:\n%s", out)
	}
	if !strings.Contains(out, "ambpf agent is not reachable") {
		t.Errorf("ADD with the agent down: unclear error:\n%s", out)
	}
	if out, err := c.run("", "status", netName, pod2.NSPath); err == nil {
		t.Errorf("cnitool status with the agent down succeeded:\n%s", out)
	}
	if pins := e.PinnedUIDs(t); len(pins) != 0 {
		t.Errorf("pins after a failed ADD: %v", pins)
	}
	if out, err := exec.Command("ip", "-n", pod2.NSName, "rule").CombinedOutput(); err != nil || strings.Contains(string(out), "lookup 100") {
		t.Errorf("pod routing after a failed ADD (%v): %s", err, out)
	}
}
