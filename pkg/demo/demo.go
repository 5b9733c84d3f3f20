//go:build linux

// Package demo runs ambpf's real parts on one machine and shows what they
// do: two nodes (network namespaces, each with its own CNI bridge and pod
// subnet, routed to each other over an inter-node link; pkg/nodelab),
// each running the ambpf-agent and ambpf-proxy binaries with its own CA
// intermediate, pods created through real CNI (cnitool with the reference
// bridge and host-local plugins, ambpf-cni chained for the mesh pods),
// then traffic on every path (mesh to mesh on one node and across nodes
// over HBONE, mesh to non-mesh passthrough, non-mesh to mesh inbound, a
// kubelet-like probe from the node), what tcpdump saw on node 1's bridge
// ports and inter-node link, `ambpfctl status`, the datapath, probe SNAT
// and proxy counters, and finally the removal of everything it created.
//
// The agents and proxies run inside their node namespaces, as they run on
// a real node's host network: the pods' host-side veths are in the
// agent's own namespace, so its probe SNAT finds them with its defaults,
// and the proxies' metrics and readiness ports (15020, 15021) stay off
// the machine's network. Nothing is attached to the machine's own
// devices.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/nodelab"
	"github.com/ambpf/ambpf/pkg/probesnat"
)

// Defaults of Config.
const (
	DefaultPrefix   = "ambpf-demo-"
	DefaultStateDir = "/run/ambpf-demo"
)

// Config configures Run.
type Config struct {
	// Prefix starts the name of every network namespace and CNI network
	// the demo creates; DefaultPrefix when empty.
	Prefix string
	// StateDir holds a fresh directory per run: the private bpffs mount,
	// the agents' and proxies' state, sockets and logs, CNI configuration
	// and IPAM data, the discovery file, the packet capture.
	// DefaultStateDir when empty.
	StateDir string
	// BinDir holds ambpf-agent, ambpf-proxy, ambpfctl and ambpf-cni
	// (make build puts them in bin/). Required.
	BinDir string
	// ToolsDir holds cnitool and the bridge, host-local and loopback
	// plugins (hack/tools.sh builds them into .cache/tools). Required.
	ToolsDir string
	// Out receives the progress lines and results; os.Stdout when nil.
	Out io.Writer
	// Logs, when set, also receives the agents' and proxies' logs (they
	// are always written to files in the run directory).
	Logs io.Writer
}

// The demo's pods: app-a, app-b and outside (not in the mesh) on node 1,
// app-c on node 2.
const (
	podA       = "app-a"
	podB       = "app-b"
	podC       = "app-c"
	podOutside = "outside"
	// k8sNamespace is the Kubernetes namespace the pods claim in CNI_ARGS.
	k8sNamespace = "demo"
)

// demo is one run's state; cleanup undoes it in reverse.
type demo struct {
	cfg     Config
	out     io.Writer
	runDir  string
	cluster *nodelab.Cluster
	n1, n2  *nodelab.Node
	pods    []*pod
	wire    *nodelab.Capture
	// dp and probes read each node's pins' counters.
	dp     map[*nodelab.Node]*datapath.Loader
	probes map[*nodelab.Node]*probesnat.Loader
	failed []string

	undo    []undoStep
	removed []string // what cleanup removed, in order
}

type undoStep struct {
	what string
	fn   func() error
}

// onCleanup registers fn to run at cleanup, in reverse order.
func (d *demo) onCleanup(what string, fn func() error) {
	d.undo = append(d.undo, undoStep{what, fn})
}

const numSteps = 6

// Run runs the demo with one progress line per step on cfg.Out. It needs
// root, the binaries in cfg.BinDir and the CNI tools in cfg.ToolsDir.
// Whatever happens (a failed check, an error, ctx cancelled by a signal)
// everything it created is removed before it returns. It returns an error
// when a check or a step failed or ctx was cancelled.
func Run(ctx context.Context, cfg Config) (err error) {
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if cfg.StateDir == "" {
		cfg.StateDir = DefaultStateDir
	}
	if cfg.Out == nil {
		cfg.Out = os.Stdout
	}
	if os.Geteuid() != 0 {
		return errors.New("the demo needs root: it creates network namespaces and runs the agents, which load BPF programs")
	}
	if err := nodelab.CheckBinaries(nodelab.Config{BinDir: cfg.BinDir, ToolsDir: cfg.ToolsDir}); err != nil {
		return err
	}
	d := &demo{cfg: cfg, out: cfg.Out}
	defer func() {
		d.step(numSteps, "Clean up: CNI DEL (unenrols), stop proxies and agents, delete netns, unmount bpffs")
		if cerr := d.cleanup(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", cerr))
			d.printf("  cleanup FAILED: %v\n", cerr)
		} else {
			d.printf("  nothing left behind\n")
		}
		if err != nil {
			d.printf("\nDEMO FAILED: %v\n", err)
		} else {
			d.printf("\nDemo passed: every connection took the path the mesh requires.\n")
		}
	}()
	steps := []struct {
		title string
		fn    func(context.Context) error
	}{
		{"Nodes: two node netns routed over an inter-node link, ambpf-agent and ambpf-proxy in each (own CA intermediate, one root)", d.startNodes},
		{"Pods through CNI: cnitool add with bridge + host-local, ambpf-cni chained for the mesh pods", d.addPods},
		{"Traffic, with tcpdump on node1's bridge ports and inter-node link", d.traffic},
		{"Wire: what tcpdump saw", d.showWire},
		{"Inspect: ambpfctl status, counters, proxy metrics, rules in app-a", d.inspect},
	}
	for i, s := range steps {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("interrupted: %w", context.Cause(ctx))
		}
		d.step(i+1, s.title)
		if err := s.fn(ctx); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("interrupted: %w", context.Cause(ctx))
			}
			d.printLogTails()
			return err
		}
	}
	if len(d.failed) > 0 {
		d.printLogTails()
		return fmt.Errorf("%d check(s) failed: %s", len(d.failed), strings.Join(d.failed, "; "))
	}
	return nil
}

func (d *demo) printf(format string, args ...any) { fmt.Fprintf(d.out, format, args...) }

func (d *demo) step(n int, title string) { d.printf("\n[%d/%d] %s\n", n, numSteps, title) }

// check records a failed expectation; the demo carries on so the whole
// picture is printed, and fails at the end.
func (d *demo) check(ok bool, what string) {
	if !ok {
		d.failed = append(d.failed, what)
		d.printf("    FAIL: %s\n", what)
	}
}

// startNodes makes the run directory and starts the two nodes in it.
func (d *demo) startNodes(ctx context.Context) error {
	if err := os.MkdirAll(d.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", d.cfg.StateDir, err)
	}
	// Remove the state directory when this run leaves it empty; another
	// run's directory keeps it (ENOTEMPTY is not an error here).
	d.onCleanup("state dir", func() error {
		if err := os.Remove(d.cfg.StateDir); err != nil && !errors.Is(err, unix.ENOTEMPTY) && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	})
	runDir, err := os.MkdirTemp(d.cfg.StateDir, "run-")
	if err != nil {
		return fmt.Errorf("create run directory: %w", err)
	}
	d.runDir = runDir
	d.onCleanup("run dir", func() error { return os.RemoveAll(runDir) })
	cl, err := nodelab.New(ctx, nodelab.Config{
		Prefix: d.cfg.Prefix, Dir: runDir, BinDir: d.cfg.BinDir, ToolsDir: d.cfg.ToolsDir,
		Nodes: 2, Logs: d.cfg.Logs,
	})
	if err != nil {
		return err
	}
	d.cluster, d.n1, d.n2 = cl, cl.Nodes[0], cl.Nodes[1]
	d.onCleanup("nodes", func() error {
		done, err := cl.CloseSteps()
		d.removed = append(d.removed, done...)
		return err
	})
	d.printf("  bpffs mounted at %s\n", cl.BPFFS())
	for _, n := range cl.Nodes {
		d.printf("  %s: netns %s, pod subnet %s, %s on the inter-node link (veth %q, the route to the other node's pods)\n", n.Name, n.NSName, n.Subnet, n.LinkAddr, nodelab.LinkName)
		d.printf("    ambpf-agent pid %d: pins under %s, API %s\n", n.Agent.Pid(), n.BPFRoot, n.APISocket)
		d.printf("    ambpf-proxy pid %d: own cgroup, connected over ZDS, CA %s (node intermediate + shared root), metrics on %s\n",
			n.Proxy.Pid(), n.CADir, nodelab.MetricsAddr)
	}
	d.printf("  shared discovery file %s: each proxy learns the other node's pods from it\n", cl.DiscoveryFile)
	return nil
}

// cleanup runs the registered undo steps in reverse and reports failures.
func (d *demo) cleanup() error {
	var errs []error
	for i := len(d.undo) - 1; i >= 0; i-- {
		u := d.undo[i]
		if err := u.fn(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", u.what, err))
			continue
		}
		if u.what != "nodes" { // the cluster lists its own steps
			d.removed = append(d.removed, u.what)
		}
	}
	d.undo = nil
	if len(d.removed) > 0 {
		d.printf("  removed: %s\n", strings.Join(d.removed, ", "))
	}
	return errors.Join(errs...)
}

// printLogTails shows the end of the agents' and proxies' logs after a
// failure.
func (d *demo) printLogTails() {
	if d.cluster == nil {
		return
	}
	for _, n := range d.cluster.Nodes {
		d.printf("\n")
		d.printIndented(n.LogTails(15))
	}
}
