//go:build linux

package nodee2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ambpf/ambpf/hack/node"
	"github.com/ambpf/ambpf/pkg/kubetest"
)

const (
	// enableEnv runs the tests; make e2e-node sets it after building
	// what they need (.ci/run calls make e2e-node).
	enableEnv = "AMBPF_E2E_NODE"
	release   = "ambpf"
	releaseNS = "ambpf-system"
	// waitLong bounds every wait for the node to act (pods scheduled,
	// sandboxes created, rollouts) on a loaded 2-core machine.
	waitLong = 3 * time.Minute
)

// env is one running node with the chart's values pointing into it.
type env struct {
	t    *testing.T
	n    *node.Node
	repo string
}

func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for d := dir; d != filepath.Dir(d); d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "charts", "ambpf", "Chart.yaml")); err == nil {
			return d
		}
	}
	t.Fatalf("no ambpf checkout above %s", dir)
	return ""
}

// startNode builds what is missing (cached: seconds when fresh), starts
// the node and registers its removal.
func startNode(t *testing.T) *env {
	t.Helper()
	if os.Getenv(enableEnv) != "1" {
		t.Skipf("the real-node tests run with %s=1: `make e2e-node` sets it after building kubelet, containerd's images and the rest (.ci/run runs it)", enableEnv)
	}
	if os.Geteuid() != 0 {
		t.Fatal("the real-node tests need root (kubelet, containerd, netns, bpffs)")
	}
	for _, bin := range []string{"containerd", "containerd-shim-runc-v2", "runc", "ctr", "tcpdump", "nft", "nsenter"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s not found (make e2e-node installs it): %v", bin, err)
		}
	}
	repo := repoRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	t.Setenv("AMBPF_KUBE_NODE", "1")
	kubeBin, err := kubetest.EnsureBinaries(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tools := os.Getenv("AMBPF_TOOLS_DIR")
	if tools == "" {
		tools = filepath.Join(repo, ".cache", "tools")
	}
	if out, err := exec.Command(filepath.Join(repo, "hack", "tools.sh")).CombinedOutput(); err != nil {
		t.Fatalf("hack/tools.sh: %v\n%s", err, out)
	}
	img := exec.Command(filepath.Join(repo, "hack", "image", "build.sh"))
	var stderr bytes.Buffer
	img.Stderr = &stderr
	out, err := img.Output()
	if err != nil {
		t.Fatalf("hack/image/build.sh: %v\n%s", err, stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	n, err := node.Start(ctx, node.Config{
		KubeBinDir: kubeBin,
		CNIBinDir:  tools,
		ImageDir:   lines[len(lines)-1],
		Logf:       t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, n: n, repo: repo}
	t.Cleanup(func() {
		if t.Failed() {
			e.dumpLogs()
		}
		if err := n.Stop(); err != nil {
			t.Errorf("stop node: %v", err)
		}
	})
	return e
}

// importImageTag builds the chart's image again under tag (same binaries,
// a new name) and imports it into the node's containerd.
func (e *env) importImageTag(tag string) {
	e.t.Helper()
	dir := e.t.TempDir()
	cmd := exec.Command(filepath.Join(e.repo, "hack", "image", "build.sh"))
	cmd.Env = append(os.Environ(), "TAG="+tag, "OUT="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		e.t.Fatalf("hack/image/build.sh TAG=%s: %v\n%s", tag, err, out)
	}
	if out, err := e.n.ImportImage(filepath.Join(dir, "ambpf.tar")); err != nil {
		e.t.Fatalf("import %s: %v\n%s", tag, err, out)
	}
}

// caServiceIP is the CA Service's ClusterIP on the test node; caNS the
// CA's own namespace (chart value ca.namespace).
const (
	caServiceIP = "10.96.0.50"
	caNS        = "ambpf-ca"
)

// followCA stands in for kube-proxy on the CA Service: until the test
// ends it points caServiceIP at the CA pod the Service's endpoints name,
// also after the pod is replaced (helm upgrade).
func (e *env) followCA() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	e.t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		current := ""
		for ctx.Err() == nil {
			out, err := e.n.Run(ctx, "kubectl", "get", "endpointslices", "-n", caNS,
				"-l", "kubernetes.io/service-name=ambpf-ca", "-o", "jsonpath={.items[0].endpoints[0].addresses[0]}")
			ip := strings.TrimSpace(out)
			if _, perr := netip.ParseAddr(ip); err == nil && perr == nil && ip != current {
				if ferr := e.n.ForwardService(caServiceIP, caPort, net.JoinHostPort(ip, strconv.Itoa(caPort))); ferr != nil {
					e.t.Logf("forward the CA Service to %s: %v", ip, ferr)
				} else {
					current = ip
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(500 * time.Millisecond):
			}
		}
	}()
}

// caPort is the chart's ca.port.
const caPort = 15012

// dumpLogs prints what a failure needs: pods, events, the mesh's logs.
func (e *env) dumpLogs() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, args := range [][]string{
		{"get", "pods", "-A", "-o", "wide"},
		{"get", "events", "-A", "--sort-by=.lastTimestamp"},
		{"logs", "-n", releaseNS, "-l", "app.kubernetes.io/component=agent", "-c", "agent", "--tail=60"},
		{"logs", "-n", releaseNS, "-l", "app.kubernetes.io/component=proxy", "--tail=60"},
		{"logs", "-n", caNS, "-l", "app.kubernetes.io/component=ca", "--tail=60"},
	} {
		out, err := e.n.Run(ctx, "kubectl", args...)
		e.t.Logf("kubectl %s (err %v):\n%s", strings.Join(args, " "), err, out)
	}
	if b, err := os.ReadFile(filepath.Join(e.n.Root, "kubelet.log")); err == nil {
		e.t.Logf("kubelet.log tail:\n%s", tail(string(b), 40))
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// kubectl runs kubectl against the node and fails the test on error.
func (e *env) kubectl(args ...string) string {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	out, err := e.n.Run(ctx, "kubectl", args...)
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

// apply pipes a manifest into kubectl apply.
func (e *env) apply(manifest string) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	cmd := e.n.Command(ctx, "kubectl", "apply", "-f", "-")
	cmd.Stdin = strings.NewReader(manifest)
	if out, err := cmd.CombinedOutput(); err != nil {
		e.t.Fatalf("kubectl apply: %v\n%s\n%s", err, out, manifest)
	}
}

// chartValues are the values that point the chart's hostPaths into the
// node's directory and run the locally imported image.
func (e *env) chartValues(extra ...string) []string {
	h := e.n.HostStateDir
	sets := []string{
		"image.pullPolicy=Never",
		"cni.binDir=" + e.n.CNIBinDir,
		"cni.confDir=" + e.n.CNIConfDir,
		"hostPaths.bpf=" + e.n.BPFRoot,
		// /var/run is a symlink to /run here and / is a private mount:
		// the runtime accepts HostToContainer propagation only from the
		// real (shared) mount point, /run/netns.
		"hostPaths.netns=/run/netns",
		"hostPaths.ztunnel=" + filepath.Join(h, "ztunnel"),
		"hostPaths.agentRun=" + filepath.Join(h, "ambpf-run"),
		"hostPaths.agentState=" + filepath.Join(h, "ambpf-state"),
		// No cluster DNS or kube-proxy runs here: the proxies dial the
		// CA by a fixed ClusterIP, which followCA forwards.
		"ca.clusterIP=" + caServiceIP,
		// The CA and its key in a namespace of their own (the chart's
		// recommended setup): the agents' and proxies' holds no key.
		"ca.namespace=" + caNS,
	}
	var args []string
	for _, s := range append(sets, extra...) {
		args = append(args, "--set", s)
	}
	return args
}

// helm runs a helm command on the release and waits for it (--wait).
func (e *env) helm(verb string, extra ...string) {
	e.t.Helper()
	args := []string{verb, release}
	if verb == "install" || verb == "upgrade" {
		args = append(args, filepath.Join(e.repo, "charts", "ambpf"), "--wait", "--timeout", "3m")
	} else {
		args = append(args, "--wait", "--timeout", "3m")
	}
	args = append(args, "-n", releaseNS)
	if verb == "install" {
		args = append(args, "--create-namespace")
	}
	args = append(args, extra...)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	if _, err := e.n.Run(ctx, "helm", args...); err != nil {
		e.t.Fatal(err)
	}
	e.t.Logf("helm %s: %v", verb, time.Since(start).Round(time.Millisecond))
}

// eventually retries cond until it returns nil or waitLong passes.
func (e *env) eventually(what string, cond func() error) {
	e.t.Helper()
	deadline := time.Now().Add(waitLong)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s: not after %v: %v", what, waitLong, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// pod is a running pod of the node.
type pod struct {
	ns, name, ip, uid string
	pid               int // a process of its app container, on the host
}

// pods returns the pods of ns with label selector sel, each Ready.
func (e *env) readyPods(ns, sel string, want int) []pod {
	e.t.Helper()
	var out []pod
	e.eventually(fmt.Sprintf("%d Ready pods %s in %s", want, sel, ns), func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		s, err := e.n.Run(ctx, "kubectl", "get", "pods", "-n", ns, "-l", sel, "-o",
			`jsonpath={range .items[*]}{.metadata.name} {.status.podIP} {.metadata.uid} {.status.containerStatuses[0].ready} {.status.containerStatuses[0].containerID} {.metadata.deletionTimestamp}{"\n"}{end}`)
		if err != nil {
			return err
		}
		out = nil
		for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
			f := strings.Fields(l)
			if len(f) == 6 {
				return fmt.Errorf("pod %s terminating", f[0])
			}
			if len(f) != 5 || f[3] != "true" {
				return fmt.Errorf("not ready: %q", l)
			}
			pid, err := e.n.ContainerPID(strings.TrimPrefix(f[4], "containerd://"))
			if err != nil {
				return err
			}
			out = append(out, pod{ns: ns, name: f[0], ip: f[1], uid: f[2], pid: pid})
		}
		if len(out) != want {
			return fmt.Errorf("%d ready pods, want %d", len(out), want)
		}
		return nil
	})
	return out
}

// exec runs the test app in p's container (kubectl exec, through
// kubelet and containerd) and returns its output and exit code.
func (e *env) exec(p pod, args ...string) (string, int) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := e.n.Command(ctx, "kubectl", append([]string{"exec", "-n", p.ns, p.name, "--", "testapp"}, args...)...)
	// stdout only: kubectl adds "command terminated with exit code N" on
	// stderr.
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			e.t.Fatalf("kubectl exec %s: %v: %s", p.name, err, stderr.String())
		}
		code = ee.ExitCode()
	}
	return strings.TrimSpace(string(out)), code
}

// nsRun runs a host command inside p's network namespace.
func (e *env) nsRun(p pod, name string, args ...string) string {
	e.t.Helper()
	cmd := exec.Command("nsenter", append([]string{"--net=/proc/" + strconv.Itoa(p.pid) + "/ns/net", name}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		e.t.Fatalf("nsenter %s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// capture runs tcpdump on the node's bridge ports until stop is called,
// then returns the decoded packets (one line each, with ASCII payload).
type capture struct {
	cmd  *exec.Cmd
	path string
}

// It listens on every host interface, filtered to the two pods: the
// bridge device itself only sees frames flooded or delivered to the host,
// its ports (the pods' host-side veths) see every frame between pods.
func (e *env) startCapture(a, b pod) *capture {
	e.t.Helper()
	c := &capture{path: filepath.Join(e.t.TempDir(), "bridge.pcap")}
	// --immediate-mode: without it packets wait in the ring for up to a
	// second, and tcpdump stopped earlier drops them.
	c.cmd = exec.Command("tcpdump", "-i", "any", "-nn", "--immediate-mode", "-U", "-w", c.path,
		fmt.Sprintf("tcp and host %s and host %s", a.ip, b.ip))
	var stderr bytes.Buffer
	c.cmd.Stderr = &stderr
	if err := c.cmd.Start(); err != nil {
		e.t.Fatalf("start tcpdump: %v", err)
	}
	e.t.Cleanup(func() { c.cmd.Process.Kill(); c.cmd.Wait() })
	e.eventually("tcpdump listening", func() error {
		if !strings.Contains(stderr.String(), "listening on") {
			return fmt.Errorf("tcpdump: %q", stderr.String())
		}
		return nil
	})
	return c
}

func (c *capture) stop(t *testing.T) []string {
	t.Helper()
	c.cmd.Process.Signal(os.Interrupt)
	c.cmd.Wait()
	out, err := exec.Command("tcpdump", "-r", c.path, "-nn", "-A").CombinedOutput()
	if err != nil {
		t.Fatalf("tcpdump -r: %v\n%s", err, out)
	}
	return strings.Split(string(out), "\n")
}
