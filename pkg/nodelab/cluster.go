//go:build linux

// Package nodelab runs ambpf nodes for real on one machine, for the demo
// and the end-to-end tests: per node a network namespace (the node's host
// network) with the ambpf-agent and ambpf-proxy binaries running in it,
// the proxy in a cgroup of its own (the datapath trusts the proxy by its
// sockets' cgroup), pods made by real CNI (cnitool with the reference
// bridge and host-local plugins, ambpf-cni chained for mesh pods). With
// two nodes, each has its own bridge and pod subnet and the two node
// namespaces are joined by a veth pair ("internode") routing each node's
// pod subnet to the other: traffic between nodes crosses that link, as it
// crosses the network between real nodes.
//
// Key material is per node: every proxy gets its own intermediate CA
// signed by one shared root (written in the cert-manager secret layout,
// see identity.LoadOrCreate), so a cross-node connection proves that two
// proxies with different keys trust each other. Remote pods are learnt
// from one discovery file shared by all proxies (WriteDiscovery).
//
// Everything a Cluster creates carries its prefix and a random ID; Close
// removes all of it, in reverse order, and reports what it could not.
package nodelab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/cgroup"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/netlab"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/probesnat"
)

// Binaries a Cluster runs from Config.BinDir and Config.ToolsDir.
var (
	AmbpfBinaries = []string{"ambpf-agent", "ambpf-proxy", "ambpfctl", "ambpf-cni"}
	CNITools      = []string{"cnitool", "bridge", "host-local", "loopback"}
)

// Addresses. Node i (0-based) has the pod subnet 10.78.i.0/24 on its
// bridge, gateway 10.78.i.1, mesh pods from .10-.99 and other pods from
// .100-.199. The inter-node link is 10.79.0.0/30: node 0 has .1, node 1
// has .2.
const (
	// MaxNodes is how many nodes a Cluster can have: two, joined by one
	// veth pair.
	MaxNodes = 2
	// BridgeName is the CNI bridge in every node.
	BridgeName = "cni0"
	// LinkName is the inter-node veth in both node namespaces.
	LinkName = "internode"
	// MetricsAddr and ReadyAddr are the proxy's listeners, in its node's
	// namespace.
	MetricsAddr = "127.0.0.1:15020"
	ReadyAddr   = "127.0.0.1:15021"
	// StartWait bounds the start of every process and the waits of the
	// lab (agent ready, proxy synced, discovery loaded).
	StartWait = 15 * time.Second
)

// Config configures New.
type Config struct {
	// Prefix starts every network namespace and CNI network name.
	// Required.
	Prefix string
	// Dir is an empty directory the cluster keeps its state in: a
	// private bpffs mount, per node the agent's and proxy's state,
	// sockets, CA and logs, the CNI configuration and IPAM data, the
	// discovery file. Required; Close leaves it empty.
	Dir string
	// BinDir holds ambpf-agent, ambpf-proxy, ambpfctl and ambpf-cni;
	// ToolsDir holds cnitool and the bridge, host-local and loopback
	// plugins. Required.
	BinDir, ToolsDir string
	// Nodes is the number of nodes, 1 or 2 (1 when zero).
	Nodes int
	// ProxyArgs are extra flags for every proxy (--mtls-mode=STRICT).
	ProxyArgs []string
	// AgentArgs are extra flags for every agent.
	AgentArgs []string
	// Logs, when set, also receives every agent's and proxy's output.
	Logs io.Writer
	// BeforeStart, when set, is called for each node once its namespace
	// and link exist, before its agent and proxy start (to give the node
	// a way to an API server, say).
	BeforeStart func(*Node) error
}

// Cluster is the nodes and everything they run. Its methods are not safe
// for concurrent use unless they say so.
type Cluster struct {
	cfg Config
	// ID is the random part of every name.
	ID string
	// Nodes are the nodes, Nodes[0] first.
	Nodes []*Node
	// DiscoveryFile is the discovery file every proxy watches.
	DiscoveryFile string
	bpffs         string
	root          *meshRoot

	mu           sync.Mutex
	pods         []*Pod
	gen          map[string]int // pod name -> how many times it was created
	discoveryGen int
	undo         []*undoStep
}

type undoStep struct {
	what string
	once sync.Once
	fn   func() error
	err  error
}

func (u *undoStep) run() error {
	u.once.Do(func() { u.err = u.fn() })
	return u.err
}

// onCleanup registers fn to run at Close, in reverse order; the returned
// step can be run earlier (it runs once).
func (c *Cluster) onCleanup(what string, fn func() error) *undoStep {
	u := &undoStep{what: what, fn: fn}
	c.mu.Lock()
	c.undo = append(c.undo, u)
	c.mu.Unlock()
	return u
}

// CheckBinaries reports a missing binary or tool of cfg.
func CheckBinaries(cfg Config) error {
	for _, set := range []struct {
		dir, field, how string
		names           []string
	}{
		{cfg.BinDir, "BinDir", "make build", AmbpfBinaries},
		{cfg.ToolsDir, "ToolsDir", "hack/tools.sh", CNITools},
	} {
		if set.dir == "" {
			return fmt.Errorf("nodelab: %s is required", set.field)
		}
		for _, n := range set.names {
			if _, err := exec.LookPath(filepath.Join(set.dir, n)); err != nil {
				return fmt.Errorf("nodelab: %s is missing (%s builds it): %w", filepath.Join(set.dir, n), set.how, err)
			}
		}
	}
	return nil
}

// RandomID returns six random hex digits.
func RandomID() string {
	var b [3]byte
	rand.Read(b[:]) // never fails (crypto/rand panics instead)
	return hex.EncodeToString(b[:])
}

// New builds the cluster: the bpffs, per node the namespace, link, CA,
// agent and proxy (waiting until the agent is ready and the proxy synced
// over ZDS), and an empty discovery file. On error what was created is
// removed again. It needs root.
func New(ctx context.Context, cfg Config) (*Cluster, error) {
	if cfg.Nodes == 0 {
		cfg.Nodes = 1
	}
	if cfg.Nodes < 1 || cfg.Nodes > MaxNodes {
		return nil, fmt.Errorf("nodelab: %d nodes, want 1 to %d", cfg.Nodes, MaxNodes)
	}
	if cfg.Prefix == "" || cfg.Dir == "" {
		return nil, errors.New("nodelab: Prefix and Dir are required")
	}
	if err := CheckBinaries(cfg); err != nil {
		return nil, err
	}
	c := &Cluster{cfg: cfg, ID: RandomID(), gen: map[string]int{}, DiscoveryFile: filepath.Join(cfg.Dir, "discovery.yaml")}
	if err := c.build(ctx); err != nil {
		if cerr := c.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", cerr))
		}
		return nil, err
	}
	return c, nil
}

func (c *Cluster) build(ctx context.Context) error {
	root, err := newMeshRoot()
	if err != nil {
		return err
	}
	c.root = root
	c.bpffs = filepath.Join(c.cfg.Dir, "bpffs")
	if err := os.Mkdir(c.bpffs, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", c.bpffs, err)
	}
	// A private bpffs keeps the pins off the machine's /sys/fs/bpf (which
	// a fresh machine does not even mount) and makes leaks visible.
	if err := unix.Mount("bpf", c.bpffs, "bpf", 0, "mode=0700"); err != nil {
		os.Remove(c.bpffs)
		return fmt.Errorf("mount bpffs at %s: %w", c.bpffs, err)
	}
	c.onCleanup("bpffs mount", c.unmountBPFFS)
	if err := c.WriteDiscovery(""); err != nil {
		return err
	}
	c.onCleanup("discovery file", func() error { return os.Remove(c.DiscoveryFile) })
	for i := range c.cfg.Nodes {
		n, err := c.addNode(i)
		if err != nil {
			return err
		}
		c.Nodes = append(c.Nodes, n)
	}
	if len(c.Nodes) == 2 {
		if err := c.link(c.Nodes[0], c.Nodes[1]); err != nil {
			return err
		}
	}
	for _, n := range c.Nodes {
		if c.cfg.BeforeStart != nil {
			if err := c.cfg.BeforeStart(n); err != nil {
				return fmt.Errorf("%s: %w", n.Name, err)
			}
		}
		if err := n.start(ctx); err != nil {
			return err
		}
	}
	return nil
}

// Name is the name of something this cluster creates:
// <prefix><id>-<suffix>.
func (c *Cluster) Name(suffix string) string { return c.cfg.Prefix + c.ID + "-" + suffix }

// BinDir is Config.BinDir.
func (c *Cluster) BinDir() string { return c.cfg.BinDir }

// BPFFS is the private bpffs mount the agents pin under.
func (c *Cluster) BPFFS() string { return c.bpffs }

// addNetns creates /run/netns/<Name(suffix)> with lo up and opens it; the
// cleanup closes the handle and deletes the namespace (with every device
// in it).
func (c *Cluster) addNetns(suffix string) (*netlab.Netns, *undoStep, error) {
	name := c.Name(suffix)
	if _, err := netlab.Run(exec.Command("ip", "netns", "add", name)); err != nil {
		return nil, nil, err
	}
	path := filepath.Join("/run/netns", name)
	h, err := netns.Open(path)
	if err != nil {
		netlab.Run(exec.Command("ip", "netns", "delete", name))
		return nil, nil, err
	}
	u := c.onCleanup("netns "+name, func() error {
		h.Close()
		_, err := netlab.Run(exec.Command("ip", "netns", "delete", name))
		return err
	})
	if _, err := netlab.Run(exec.Command("ip", "-n", name, "link", "set", "lo", "up")); err != nil {
		return nil, nil, err
	}
	return &netlab.Netns{Name: suffix, NSName: name, NSPath: path, NS: h}, u, nil
}

// addCgroup creates <cgroup2>/<prefix><id>-<name>, removed by the cleanup
// once its processes have stopped.
func (c *Cluster) addCgroup(name string) (string, error) {
	mnt, err := cgroup.Mount()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(mnt, c.Name(name))
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", fmt.Errorf("create cgroup %s: %w", dir, err)
	}
	c.onCleanup("cgroup "+filepath.Base(dir), func() error {
		// A stopped process leaves its cgroup asynchronously.
		return waitUntil(netlab.DefaultStopWait, func() (bool, error) {
			err := os.Remove(dir)
			return err == nil || errors.Is(err, os.ErrNotExist), err
		})
	})
	return dir, nil
}

// unmountBPFFS checks that the agents left no pins (CNI DEL unenrolled
// every pod, which detaches its datapath and probe SNAT), then unmounts.
func (c *Cluster) unmountBPFFS() error {
	var errs []error
	for _, n := range c.Nodes {
		// What stays after the last pod, by design: the node-wide
		// programs and maps (datapath and probe SNAT) and the proxy
		// cgroup set, removed as an uninstall would.
		if dp, err := datapath.New(datapath.Config{Root: n.BPFRoot, Logger: slog.New(slog.DiscardHandler)}); err != nil {
			errs = append(errs, err)
		} else if err := dp.RemoveNodeState(); err != nil {
			errs = append(errs, err)
		}
		if ps, err := probesnat.New(probesnat.Config{Root: n.BPFRoot, Logger: slog.New(slog.DiscardHandler)}); err != nil {
			errs = append(errs, err)
		} else {
			errs = append(errs, ps.RemoveNodeState(), ps.Close())
		}
	}
	var left []string
	for _, n := range c.Nodes {
		// Only the agents' roots: bpffs has files of its own.
		filepath.WalkDir(n.BPFRoot, func(path string, e os.DirEntry, err error) error {
			if err == nil && !e.IsDir() {
				left = append(left, strings.TrimPrefix(path, c.bpffs+"/"))
			}
			return nil
		})
	}
	if len(left) > 0 {
		errs = append(errs, fmt.Errorf("pins left after the pods were deleted: %s", strings.Join(left, ", ")))
	}
	if err := unix.Unmount(c.bpffs, unix.MNT_DETACH); err != nil {
		errs = append(errs, fmt.Errorf("unmount %s: %w", c.bpffs, err))
	}
	errs = append(errs, os.Remove(c.bpffs))
	return errors.Join(errs...)
}

// Close removes everything the cluster created, in reverse order: pods
// (CNI DEL, which unenrols them), proxies and agents, cgroups, namespaces,
// the bpffs mount, the files in Dir. It returns every failure joined, and
// the steps done through Done. A second Close does nothing.
func (c *Cluster) Close() error {
	_, err := c.CloseSteps()
	return err
}

// CloseSteps is Close that also returns the names of the steps it did.
func (c *Cluster) CloseSteps() ([]string, error) {
	c.mu.Lock()
	undo := c.undo
	c.undo = nil
	c.mu.Unlock()
	var errs []error
	var done []string
	for i := len(undo) - 1; i >= 0; i-- {
		u := undo[i]
		if err := u.run(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", u.what, err))
			continue
		}
		done = append(done, u.what)
	}
	return done, errors.Join(errs...)
}

// waitUntil polls cond every 20 ms until it is done or d has passed; then
// it returns cond's last error (or a timeout).
func waitUntil(d time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(d)
	for {
		ok, err := cond()
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("not done within %v", d)
			}
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitAgent waits until n's agent answers ready and ok holds of its
// status; it fails at once when the agent or the proxy exited.
func (n *Node) waitAgent(ctx context.Context, ok func(agentapi.Status) bool) error {
	c := agentapi.NewClient(n.APISocket)
	var last error
	ctx, cancel := context.WithTimeout(ctx, StartWait)
	defer cancel()
	for {
		st, err := c.Status(ctx)
		if err == nil && st.Ready && ok(st) {
			return nil
		}
		last = err
		if err == nil {
			last = fmt.Errorf("ready=%t, %d proxies synced", st.Ready, st.Proxy.Synced)
		}
		for _, p := range []*netlab.Process{n.Agent, n.Proxy} {
			if p != nil && p.Exited() {
				return fmt.Errorf("%s exited: %v\n%s", p.Name(), p.Err(), p.Tail(10))
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s agent: %w (last: %v)", n.Name, context.Cause(ctx), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// podAddr is the address of host h in node i's pod subnet.
func podAddr(i int, h byte) netip.Addr { return netip.AddrFrom4([4]byte{10, 78, byte(i), h}) }
