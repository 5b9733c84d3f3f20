//go:build linux

// Package node runs a real single Kubernetes node on this machine for the
// end-to-end tests: etcd and kube-apiserver (pkg/kubetest), kube-scheduler,
// kube-controller-manager, kubelet, containerd with runc, and the reference
// bridge + host-local CNI plugins in a conflist that containerd reads. The
// images of `make image` are imported into containerd (there is no
// registry), so the chart's pods run from them with imagePullPolicy Never.
//
// Everything state-bearing lives in one temporary directory: containerd's
// root, state and sockets, kubelet's root dir and pod logs, the CNI
// directories, a bpffs for the chart's bpf hostPath. Host-wide objects are
// named for the node and removed by Stop: the bridge BridgeName, the nft
// table NFTable, cgroups under CgroupRoot in every hierarchy, the network
// namespaces containerd created, the kernel tunables kubelet sets (saved
// and restored). Only one node runs on a machine at a time (a lock).
//
// The host's cgroup layout is hybrid (v1 controllers, cgroup2 at
// /sys/fs/cgroup/unified): kubelet v1.37 runs on cgroup v1 with
// failCgroupV1: false (its default) and the cgroupfs driver; containerd 1.6
// has no RuntimeConfig CRI call, so kubelet falls back to its configured
// driver (and warns that 1.38 drops that fallback).
package node

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambpf/ambpf/pkg/kubetest"
	"github.com/ambpf/ambpf/pkg/netlab"
)

// Names and addresses of the node's host-wide objects.
const (
	Name       = "ambpf-node"
	BridgeName = "ambpfnode0"
	NFTable    = "ambpf_node"
	// CgroupRoot is kubelet's --cgroup-root: pods' cgroups live under it
	// in every hierarchy, apart from the machine's own.
	CgroupRoot = "/ambpf-node"
	// PodCIDR is the pods' subnet on the bridge; NodeIP is the bridge's
	// address, the node's InternalIP and the API server's address.
	PodCIDR = "10.213.0.0/24"
	NodeIP  = "10.213.0.1"
	// KubernetesServiceIP is the kubernetes Service's ClusterIP
	// (first address of kubetest.ServiceCIDR). No kube-proxy runs: the
	// nft table NFTable DNATs it to the API server.
	KubernetesServiceIP = "10.96.0.1"
	// Images imported into containerd by Start (see hack/image/build.sh).
	PauseImage   = "localhost/ambpf-pause:1"
	TestAppImage = "localhost/ambpf-testapp:1"
	// ChartImageRepository is the chart's image.repository.
	ChartImageRepository = "ghcr.io/ambpf/ambpf"
)

// Timeouts sized for a loaded 2-core machine.
const (
	containerdReadyTimeout = 60 * time.Second
	nodeReadyTimeout       = 3 * time.Minute
	drainTimeout           = 3 * time.Minute
	stopGrace              = 15 * time.Second
)

// kernelTunables are the sysctls kubelet sets on start (its
// protectKernelDefaults: false behaviour); Start saves them and Stop puts
// the machine's values back.
var kernelTunables = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
}

// Config says where Start finds its binaries and images.
type Config struct {
	// KubeBinDir holds etcd, kube-apiserver, kubelet, kube-scheduler,
	// kube-controller-manager, kubectl and helm (hack/kube/build.sh with
	// AMBPF_KUBE_NODE=1).
	KubeBinDir string
	// CNIBinDir holds the reference plugins bridge, host-local, loopback
	// (hack/tools.sh).
	CNIBinDir string
	// ImageDir holds ambpf.tar, testapp.tar, pause.tar (hack/image/build.sh).
	ImageDir string
	// Logf, when set, receives progress lines (a test's t.Logf).
	Logf func(format string, args ...any)
}

// Node is a running single-node cluster. Its exported paths are for the
// chart's values and for tests that look at the node's state.
type Node struct {
	*kubetest.ControlPlane

	// Root is the temporary directory holding all of the node's state.
	Root string
	// CNIBinDir and CNIConfDir are containerd's CNI directories, the
	// chart's cni.binDir and cni.confDir.
	CNIBinDir, CNIConfDir string
	// ConflistPath is the primary CNI conflist ambpf-cni is chained into.
	ConflistPath string
	// BPFRoot is a bpffs mounted for this node, the chart's hostPaths.bpf.
	BPFRoot string
	// HostStateDir holds the chart's other hostPaths (ztunnel, agent run
	// and state dirs, netns stays the host's /var/run/netns).
	HostStateDir string
	// ContainerdSocket is containerd's gRPC socket (CRI and ctr).
	ContainerdSocket string

	cfg        Config
	containerd *kubetest.Process
	kubelet    *kubetest.Process
	scheduler  *kubetest.Process
	controller *kubetest.Process
	tunables   map[string]string
	netnsSeen  map[string]bool
	// shimDirs are the directories containerd 1.6's shims create under
	// /run/containerd whatever the config says (sockets named by a hash
	// of this node's address), that did not exist before Start.
	shimDirs []string
	// forwards are the Service ports ForwardService stands in for
	// kube-proxy on, ClusterIP:port -> endpoint.
	fwMu     sync.Mutex
	forwards map[string]string
	unlock   func()
	stopped  bool
}

func (n *Node) logf(format string, args ...any) {
	if n.cfg.Logf != nil {
		n.cfg.Logf(format, args...)
	}
}

// Start brings the node up and returns once it is Ready with its images
// imported, the default ServiceAccount and kube-root-ca.crt present. On
// error everything started is stopped again.
func Start(ctx context.Context, cfg Config) (*Node, error) {
	unlock, err := lock()
	if err != nil {
		return nil, err
	}
	root, err := os.MkdirTemp("", "ambpf-node-")
	if err != nil {
		unlock()
		return nil, fmt.Errorf("create node dir: %w", err)
	}
	n := &Node{
		Root:             root,
		CNIBinDir:        filepath.Join(root, "cni", "bin"),
		CNIConfDir:       filepath.Join(root, "cni", "net.d"),
		BPFRoot:          filepath.Join(root, "bpffs"),
		HostStateDir:     filepath.Join(root, "host"),
		ContainerdSocket: filepath.Join(root, "containerd", "containerd.sock"),
		cfg:              cfg,
		unlock:           unlock,
	}
	n.ConflistPath = filepath.Join(n.CNIConfDir, "10-ambpf-node.conflist")
	steps := []struct {
		name string
		fn   func(context.Context) error
	}{
		{"save kernel tunables", n.saveTunables},
		{"host network", n.setupNetwork},
		{"bpffs", n.mountBPF},
		{"control plane", n.startControlPlane},
		{"cni", n.writeCNI},
		{"cgroups", n.makeCgroups},
		{"containerd", n.startContainerd},
		{"images", n.importImages},
		{"scheduler and controller manager", n.startControllers},
		{"kubelet", n.startKubelet},
		{"node ready", n.waitReady},
	}
	for _, s := range steps {
		start := time.Now()
		if err := s.fn(ctx); err != nil {
			return nil, errors.Join(fmt.Errorf("node: %s: %w", s.name, err), n.Stop())
		}
		n.logf("node: %s: %v", s.name, time.Since(start).Round(time.Millisecond))
	}
	return n, nil
}

// lock makes this the machine's only node: the bridge, nft table and
// cgroup root have fixed names.
func lock() (func(), error) {
	f, err := os.OpenFile("/run/ambpf-node.lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open node lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock node: %w", err)
	}
	return func() { f.Close() }, nil
}

func run(name string, args ...string) (string, error) {
	out, err := netlab.Run(exec.Command(name, args...))
	return string(out), err
}

func (n *Node) saveTunables(context.Context) error {
	n.tunables = map[string]string{}
	for _, k := range kernelTunables {
		b, err := os.ReadFile("/proc/sys/" + k)
		if err != nil {
			return fmt.Errorf("read %s: %w", k, err)
		}
		n.tunables[k] = strings.TrimSpace(string(b))
	}
	return nil
}

// setupNetwork creates the bridge with the node's address (before kubelet,
// which needs its node IP; the bridge plugin adopts it) and the nft table
// that plays kube-proxy for the one Service pods need: kubernetes.
func (n *Node) setupNetwork(context.Context) error {
	n.netnsSeen = map[string]bool{}
	if ents, err := os.ReadDir("/var/run/netns"); err == nil {
		for _, e := range ents {
			n.netnsSeen[e.Name()] = true
		}
	}
	// Left over by a node whose test was killed: the lock says it is dead.
	n.removeNetwork()
	if _, err := run("ip", "link", "add", BridgeName, "type", "bridge"); err != nil {
		return err
	}
	if _, err := run("ip", "addr", "add", NodeIP+"/24", "dev", BridgeName); err != nil {
		return err
	}
	if _, err := run("ip", "link", "set", BridgeName, "up"); err != nil {
		return err
	}
	return nil
}

// setupServiceDNAT points the kubernetes Service IP at the API server,
// for pods (prerouting) and host-network pods (output).
func (n *Node) setupServiceDNAT() error {
	u := strings.TrimPrefix(n.Server, "https://")
	_, port, err := net.SplitHostPort(u)
	if err != nil {
		return fmt.Errorf("parse %s: %w", n.Server, err)
	}
	n.fwMu.Lock()
	defer n.fwMu.Unlock()
	n.forwards = map[string]string{net.JoinHostPort(KubernetesServiceIP, "443"): net.JoinHostPort(NodeIP, port)}
	return n.writeForwards()
}

// ForwardService stands in for kube-proxy on one Service port: TCP from
// pods and the node to clusterIP:port goes to the endpoint to (ip:port),
// replacing what that Service port went to before. No kube-proxy runs on
// this node; the kubernetes Service is forwarded from the start.
func (n *Node) ForwardService(clusterIP string, port int, to string) error {
	n.fwMu.Lock()
	defer n.fwMu.Unlock()
	n.forwards[net.JoinHostPort(clusterIP, strconv.Itoa(port))] = to
	return n.writeForwards()
}

// writeForwards rewrites the nft table with every forward, in one
// transaction. The caller holds fwMu.
func (n *Node) writeForwards() error {
	var rules strings.Builder
	for from, to := range n.forwards {
		ip, port, _ := net.SplitHostPort(from)
		fmt.Fprintf(&rules, "ip daddr %s tcp dport %s dnat to %s; ", ip, port, to)
	}
	script := fmt.Sprintf(`table ip %[1]s {}
flush table ip %[1]s
table ip %[1]s {
	chain prerouting { type nat hook prerouting priority -100; %[2]s}
	chain output { type nat hook output priority -100; %[2]s}
}
`, NFTable, rules.String())
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	_, err := netlab.Run(cmd)
	return err
}

func (n *Node) removeNetwork() error {
	var errs []error
	if _, err := os.Stat("/sys/class/net/" + BridgeName); err == nil {
		if _, err := run("ip", "link", "del", BridgeName); err != nil {
			errs = append(errs, err)
		}
	}
	if out, _ := run("nft", "list", "tables"); strings.Contains(out, "table ip "+NFTable+"\n") || strings.HasSuffix(strings.TrimSpace(out), "table ip "+NFTable) {
		if _, err := run("nft", "delete", "table", "ip", NFTable); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (n *Node) mountBPF(context.Context) error {
	if err := os.MkdirAll(n.BPFRoot, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", n.BPFRoot, err)
	}
	if err := syscall.Mount("bpf", n.BPFRoot, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", n.BPFRoot, err)
	}
	// The agent mounts it with HostToContainer propagation, which the
	// runtime allows only from a shared or slave mount.
	if err := syscall.Mount("", n.BPFRoot, "", syscall.MS_SHARED, ""); err != nil {
		return fmt.Errorf("make %s shared: %w", n.BPFRoot, err)
	}
	return nil
}

func (n *Node) startControlPlane(ctx context.Context) error {
	cp, err := kubetest.NewWithOptions(ctx, n.cfg.KubeBinDir, kubetest.Options{
		Address:                 net.ParseIP(NodeIP),
		ExtraSANs:               []net.IP{net.ParseIP(KubernetesServiceIP)},
		ServiceAccountAdmission: true,
		// kubectl exec/logs reach kubelet at the node's IP: its name is
		// in no DNS.
		ExtraArgs: []string{"--kubelet-preferred-address-types=InternalIP"},
	})
	if err != nil {
		return err
	}
	n.ControlPlane = cp
	return n.setupServiceDNAT()
}

// writeCNI copies the reference plugins and writes the primary conflist.
func (n *Node) writeCNI(context.Context) error {
	for _, d := range []string{n.CNIBinDir, n.CNIConfDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		data, err := os.ReadFile(filepath.Join(n.cfg.CNIBinDir, p))
		if err != nil {
			return fmt.Errorf("read CNI plugin: %w", err)
		}
		if err := os.WriteFile(filepath.Join(n.CNIBinDir, p), data, 0o755); err != nil {
			return fmt.Errorf("copy CNI plugin: %w", err)
		}
	}
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "ambpf-node",
		"plugins": []any{map[string]any{
			"type":             "bridge",
			"bridge":           BridgeName,
			"isGateway":        true,
			"isDefaultGateway": true,
			"hairpinMode":      true,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": PodCIDR, "gateway": NodeIP}}},
				"dataDir": filepath.Join(n.Root, "cni", "ipam"),
			},
		}},
	}
	data, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return fmt.Errorf("marshal conflist: %w", err)
	}
	if err := os.WriteFile(n.ConflistPath, data, 0o644); err != nil {
		return fmt.Errorf("write conflist: %w", err)
	}
	return nil
}

// cgroupHierarchies returns the mount points of every cgroup hierarchy
// (v1 controllers, name=systemd, cgroup2).
func cgroupHierarchies() ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("open mountinfo: %w", err)
	}
	defer f.Close()
	var mounts []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		i := slices.Index(fields, "-")
		if i < 0 || i+1 >= len(fields) {
			continue
		}
		if t := fields[i+1]; t == "cgroup" || t == "cgroup2" {
			mounts = append(mounts, fields[4])
		}
	}
	return mounts, sc.Err()
}

func (n *Node) makeCgroups(context.Context) error {
	mounts, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	for _, m := range mounts {
		if err := os.MkdirAll(filepath.Join(m, CgroupRoot), 0o755); err != nil {
			return fmt.Errorf("create cgroup root: %w", err)
		}
	}
	return nil
}

// removeCgroups removes CgroupRoot's tree in every hierarchy, deepest
// first (rmdir is the only way to delete a cgroup). A cgroup still holding
// a process is an error.
func removeCgroups() error {
	mounts, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	var errs []error
	for _, m := range mounts {
		top := filepath.Join(m, CgroupRoot)
		var dirs []string
		filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := retryBusy(func() error { return syscall.Rmdir(dirs[i]) }); err != nil && !errors.Is(err, syscall.ENOENT) {
				errs = append(errs, fmt.Errorf("rmdir %s: %w", dirs[i], err))
			}
		}
	}
	return errors.Join(errs...)
}

// retryBusy retries fn while it fails with EBUSY (a cgroup whose last
// process is still exiting) for a few seconds.
func retryBusy(fn func() error) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := fn()
		if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (n *Node) containerdConfig() string {
	cd := filepath.Join(n.Root, "containerd")
	return fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[5]q
  enable_selinux = false
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = %[8]q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[6]q
    conf_dir = %[7]q
    max_conf_num = 1
`, filepath.Join(cd, "root"), filepath.Join(cd, "state"), n.ContainerdSocket, n.ContainerdSocket+".ttrpc",
		PauseImage, n.CNIBinDir, n.CNIConfDir, filepath.Join(cd, "runc"))
}

func (n *Node) startContainerd(ctx context.Context) error {
	for _, d := range []string{"/run/containerd", "/run/containerd/s"} {
		if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) {
			n.shimDirs = append([]string{d}, n.shimDirs...)
		}
	}
	cd := filepath.Join(n.Root, "containerd")
	if err := os.MkdirAll(cd, 0o711); err != nil {
		return fmt.Errorf("create %s: %w", cd, err)
	}
	conf := filepath.Join(cd, "config.toml")
	if err := os.WriteFile(conf, []byte(n.containerdConfig()), 0o644); err != nil {
		return fmt.Errorf("write containerd config: %w", err)
	}
	p, err := kubetest.StartProcess("containerd", "containerd", []string{"--config", conf, "--log-level", "info"}, nil, filepath.Join(n.Root, "containerd.log"))
	if err != nil {
		return err
	}
	n.containerd = p
	return waitFor(ctx, p, containerdReadyTimeout, func() error {
		_, err := n.ctr("version")
		return err
	})
}

// ctr runs Debian's ctr against this node's containerd, in the CRI's
// namespace.
func (n *Node) ctr(args ...string) (string, error) {
	return run("ctr", append([]string{"--address", n.ContainerdSocket, "--namespace", "k8s.io"}, args...)...)
}

func (n *Node) importImages(context.Context) error {
	for _, img := range []string{"pause.tar", "testapp.tar", "ambpf.tar"} {
		if _, err := n.ImportImage(filepath.Join(n.cfg.ImageDir, img)); err != nil {
			return err
		}
	}
	return nil
}

// ImportImage imports an OCI image tarball into containerd, where kubelet
// finds it (pods must not pull: there is no registry); it returns ctr's
// output, which names the image.
func (n *Node) ImportImage(tarball string) (string, error) {
	return n.ctr("images", "import", "--no-unpack=false", tarball)
}

func (n *Node) startControllers(ctx context.Context) error {
	ports, err := freePorts(2)
	if err != nil {
		return err
	}
	n.scheduler, err = kubetest.StartProcess("kube-scheduler", filepath.Join(n.cfg.KubeBinDir, "kube-scheduler"), []string{
		"--kubeconfig=" + n.Kubeconfig,
		"--authentication-kubeconfig=" + n.Kubeconfig,
		"--authorization-kubeconfig=" + n.Kubeconfig,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(ports[0]),
	}, nil, filepath.Join(n.Root, "kube-scheduler.log"))
	if err != nil {
		return err
	}
	n.controller, err = kubetest.StartProcess("kube-controller-manager", filepath.Join(n.cfg.KubeBinDir, "kube-controller-manager"), []string{
		"--kubeconfig=" + n.Kubeconfig,
		"--authentication-kubeconfig=" + n.Kubeconfig,
		"--authorization-kubeconfig=" + n.Kubeconfig,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(ports[1]),
		"--root-ca-file=" + n.CAFile,
		"--service-account-private-key-file=" + n.ServiceAccountKeyFile,
		"--use-service-account-credentials=false",
		"--service-cluster-ip-range=" + kubetest.ServiceCIDR,
	}, nil, filepath.Join(n.Root, "kube-controller-manager.log"))
	return err
}

func (n *Node) kubeletConfig(port, healthz int) string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine's cgroups are v1 (hybrid, cgroup2 at /sys/fs/cgroup/unified):
# allowed in kubelet v1.37 unless failCgroupV1 is true.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: %[1]s
failSwapOn: false
containerRuntimeEndpoint: unix://%[2]s
address: %[3]s
port: %[4]d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %[5]d
podCIDR: %[6]s
maxPods: 110
podLogsDir: %[7]s
serializeImagePulls: false
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
# A shared CI disk must not get the node's pods evicted.
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%%", "imagefs.available": "1%%", "nodefs.inodesFree": "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
`, CgroupRoot, n.ContainerdSocket, NodeIP, port, healthz, PodCIDR, filepath.Join(n.Root, "pod-logs"))
}

func (n *Node) startKubelet(ctx context.Context) error {
	ports, err := freePorts(2)
	if err != nil {
		return err
	}
	dir := filepath.Join(n.Root, "kubelet")
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	conf := filepath.Join(n.Root, "kubelet.yaml")
	if err := os.WriteFile(conf, []byte(n.kubeletConfig(ports[0], ports[1])), 0o644); err != nil {
		return fmt.Errorf("write kubelet config: %w", err)
	}
	n.kubelet, err = kubetest.StartProcess("kubelet", filepath.Join(n.cfg.KubeBinDir, "kubelet"), []string{
		"--config=" + conf,
		"--kubeconfig=" + n.Kubeconfig,
		"--root-dir=" + dir,
		"--cert-dir=" + filepath.Join(dir, "pki"),
		"--hostname-override=" + Name,
		"--node-ip=" + NodeIP,
		"--v=1",
	}, nil, filepath.Join(n.Root, "kubelet.log"))
	return err
}

func (n *Node) waitReady(ctx context.Context) error {
	return waitFor(ctx, n.kubelet, nodeReadyTimeout, func() error {
		for _, p := range []*kubetest.Process{n.containerd, n.scheduler, n.controller} {
			if p.Exited() {
				return fmt.Errorf("a node process exited: %s", p.LogTail(20))
			}
		}
		node, err := n.Client.CoreV1().Nodes().Get(ctx, Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		ready := false
		for _, c := range node.Status.Conditions {
			if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
				ready = true
			}
		}
		if !ready {
			return fmt.Errorf("node %s not Ready: %v", Name, node.Status.Conditions)
		}
		if _, err := n.Client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
			return fmt.Errorf("default ServiceAccount: %w", err)
		}
		if _, err := n.Client.CoreV1().ConfigMaps("default").Get(ctx, "kube-root-ca.crt", metav1.GetOptions{}); err != nil {
			return fmt.Errorf("kube-root-ca.crt: %w", err)
		}
		return nil
	})
}

// waitFor polls cond until it succeeds, p exits, ctx ends or timeout
// passes.
func waitFor(ctx context.Context, p *kubetest.Process, timeout time.Duration, cond func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		if p != nil && p.Exited() {
			return fmt.Errorf("process exited: %s", p.LogTail(30))
		}
		if last = cond(); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: last: %v", ctx.Err(), last)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func freePorts(k int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for range k {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("pick a port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// ContainerPID returns the host pid of a running container's first
// process (a pod's container status names the id as containerd://<id>).
func (n *Node) ContainerPID(id string) (int, error) {
	out, err := n.ctr("tasks", "ls")
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) >= 3 && f[0] == id {
			if f[2] != "RUNNING" {
				return 0, fmt.Errorf("container %s is %s", id, f[2])
			}
			return strconv.Atoi(f[1])
		}
	}
	return 0, fmt.Errorf("container %s has no task", id)
}
