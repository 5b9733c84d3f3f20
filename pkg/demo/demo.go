//go:build linux

// Package demo runs ambpf's real parts on one machine and shows what they
// do: a node network namespace, pods created through real CNI (cnitool
// with the reference bridge and host-local plugins, ambpf-cni chained for
// the mesh pods), the ambpf-agent and ambpf-proxy binaries as processes,
// then traffic on every path (mesh to mesh over HBONE, mesh to non-mesh
// passthrough, non-mesh to mesh inbound, a kubelet-like probe from the
// node), what tcpdump saw on the bridge ports, `ambpfctl status`, the
// datapath, probe SNAT and proxy counters, and finally the removal of
// everything it created.
//
// The agent and the proxy run inside the demo's node namespace, as they
// run on a real node's host network: the pods' host-side veths are in the
// agent's own namespace, so its probe SNAT finds them with its defaults,
// and the proxy's metrics and readiness ports (15020, 15021) stay off the
// machine's network. Nothing is attached to the machine's own devices.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/cgroup"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/netlab"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/probesnat"
)

// Defaults of Config.
const (
	DefaultPrefix   = "ambpf-demo-"
	DefaultStateDir = "/run/ambpf-demo"
)

// Binaries the demo runs from Config.BinDir and Config.ToolsDir.
var (
	ambpfBinaries = []string{"ambpf-agent", "ambpf-proxy", "ambpfctl", "ambpf-cni"}
	cniTools      = []string{"cnitool", "bridge", "host-local", "loopback"}
)

// Config configures Run.
type Config struct {
	// Prefix starts the name of every network namespace and CNI network
	// the demo creates; DefaultPrefix when empty.
	Prefix string
	// StateDir holds a fresh directory per run: the private bpffs mount,
	// the agent's and proxy's state, sockets and logs, CNI configuration
	// and IPAM data, the packet capture. DefaultStateDir when empty.
	StateDir string
	// BinDir holds ambpf-agent, ambpf-proxy, ambpfctl and ambpf-cni
	// (make build puts them in bin/). Required.
	BinDir string
	// ToolsDir holds cnitool and the bridge, host-local and loopback
	// plugins (hack/tools.sh builds them into .cache/tools). Required.
	ToolsDir string
	// Out receives the progress lines and results; os.Stdout when nil.
	Out io.Writer
	// Logs, when set, also receives the agent's and proxy's logs (they
	// are always written to files in the run directory).
	Logs io.Writer
}

// The demo's pods: two in the mesh, one outside it.
const (
	podA       = "app-a"
	podB       = "app-b"
	podOutside = "outside"
	// k8sNamespace is the Kubernetes namespace the pods claim in CNI_ARGS.
	k8sNamespace = "demo"
)

// demo is one run's state; cleanup undoes it in reverse.
type demo struct {
	cfg    Config
	out    io.Writer
	id     string // random part of every name
	runDir string
	bpffs  string
	node   *netlab.Netns
	agent  *process
	proxy  *process
	cni    *cniRunner
	pods   []*pod
	wire   *capture
	dp     *datapath.Loader  // reads the pins' counters
	probes *probesnat.Loader // reads the probe SNAT pins
	failed []string

	undo []undoStep
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
		return errors.New("the demo needs root: it creates network namespaces and runs the agent, which loads BPF programs")
	}
	if err := checkBinaries(cfg); err != nil {
		return err
	}
	d := &demo{cfg: cfg, out: cfg.Out, id: randomID()}
	defer func() {
		d.step(numSteps, "Clean up: CNI DEL (unenrols), stop proxy and agent, delete netns, unmount bpffs")
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
		{"Node: private bpffs, node netns, ambpf-agent and ambpf-proxy started in it", d.startNode},
		{"Pods through CNI: cnitool add with bridge + host-local, ambpf-cni chained for the mesh pods", d.addPods},
		{"Traffic, with tcpdump on the node's bridge ports", d.traffic},
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

func checkBinaries(cfg Config) error {
	for _, set := range []struct {
		dir, flag, how string
		names          []string
	}{
		{cfg.BinDir, "BinDir", "make build", ambpfBinaries},
		{cfg.ToolsDir, "ToolsDir", "hack/tools.sh", cniTools},
	} {
		if set.dir == "" {
			return fmt.Errorf("demo: %s is required", set.flag)
		}
		for _, n := range set.names {
			if _, err := exec.LookPath(filepath.Join(set.dir, n)); err != nil {
				return fmt.Errorf("demo: %s is missing (%s builds it): %w", filepath.Join(set.dir, n), set.how, err)
			}
		}
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

// name is the name of something this run creates: <prefix><id>-<suffix>.
func (d *demo) name(suffix string) string { return d.cfg.Prefix + d.id + "-" + suffix }

// startNode mounts the private bpffs, creates the node namespace and
// starts the agent and the proxy in it.
func (d *demo) startNode(ctx context.Context) error {
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
	d.bpffs = filepath.Join(runDir, "bpffs")
	if err := os.Mkdir(d.bpffs, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", d.bpffs, err)
	}
	// A private bpffs keeps the demo's pins off the machine's /sys/fs/bpf
	// (which a fresh machine does not even mount) and makes leaks visible.
	if err := unix.Mount("bpf", d.bpffs, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", d.bpffs, err)
	}
	d.onCleanup("bpffs mount", d.unmountBPFFS)
	d.printf("  bpffs mounted at %s\n", d.bpffs)

	node, err := d.addNetns("node")
	if err != nil {
		return err
	}
	d.node = node
	d.printf("  node netns %s\n", node.NSName)

	root := filepath.Join(d.bpffs, "ambpf")
	d.agent, err = d.startProcess(ctx, "agent", "", filepath.Join(d.cfg.BinDir, "ambpf-agent"),
		"--bpf-root", root, "--state-dir", filepath.Join(runDir, "agent"),
		"--zds-socket", d.zdsSocket(), "--api-socket", d.apiSocket(), "--ready-addr", "off")
	if err != nil {
		return err
	}
	if err := d.waitAgent(ctx, func(synced int) bool { return true }); err != nil {
		return err
	}
	d.printf("  ambpf-agent pid %d: pins under %s, API %s, ZDS %s, probe snat on the node's veths\n",
		d.agent.cmd.Process.Pid, root, d.apiSocket(), d.zdsSocket())
	// The proxy gets a cgroup of its own, as a Kubernetes container does:
	// the agent trusts the proxy's cgroup, not its mark.
	proxyCgroup, err := d.addCgroup("proxy")
	if err != nil {
		return err
	}
	d.proxy, err = d.startProcess(ctx, "proxy", proxyCgroup, filepath.Join(d.cfg.BinDir, "ambpf-proxy"),
		"--zds-path", d.zdsSocket(), "--state-dir", filepath.Join(runDir, "proxy"),
		"--metrics-addr", metricsAddr, "--ready-addr", "127.0.0.1:15021")
	if err != nil {
		return err
	}
	if err := d.waitAgent(ctx, func(synced int) bool { return synced == 1 }); err != nil {
		return err
	}
	d.printf("  ambpf-proxy pid %d: connected over ZDS, CA in %s, metrics on %s (node netns)\n",
		d.proxy.cmd.Process.Pid, filepath.Join(runDir, "proxy", "ca"), metricsAddr)
	return nil
}

func (d *demo) zdsSocket() string { return filepath.Join(d.runDir, "zds.sock") }
func (d *demo) apiSocket() string { return filepath.Join(d.runDir, "agent.sock") }

// addNetns creates /run/netns/<name(suffix)> with lo up and opens it; the
// cleanup closes the handle and deletes the namespace (with every device
// in it).
func (d *demo) addNetns(suffix string) (*netlab.Netns, error) {
	name := d.name(suffix)
	if _, err := netlab.Run(exec.Command("ip", "netns", "add", name)); err != nil {
		return nil, err
	}
	path := filepath.Join("/run/netns", name)
	h, err := netns.Open(path)
	if err != nil {
		netlab.Run(exec.Command("ip", "netns", "delete", name))
		return nil, err
	}
	d.onCleanup("netns "+name, func() error {
		h.Close()
		_, err := netlab.Run(exec.Command("ip", "netns", "delete", name))
		return err
	})
	if _, err := netlab.Run(exec.Command("ip", "-n", name, "link", "set", "lo", "up")); err != nil {
		return nil, err
	}
	return &netlab.Netns{Name: suffix, NSName: name, NSPath: path, NS: h}, nil
}

// addCgroup creates <cgroup2>/ambpf-demo-<run>-<name>, removed by the
// cleanup once its process has stopped.
func (d *demo) addCgroup(name string) (string, error) {
	mnt, err := cgroup.Mount()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(mnt, "ambpf-demo-"+filepath.Base(d.runDir)+"-"+name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", fmt.Errorf("create cgroup %s: %w", dir, err)
	}
	d.onCleanup("cgroup "+dir, func() error {
		// A stopped process leaves its cgroup asynchronously.
		deadline := time.Now().Add(stopWait)
		for {
			err := os.Remove(dir)
			if err == nil || errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
				return err
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	return dir, nil
}

// unmountBPFFS checks that the agent left no pins (CNI DEL unenrolled
// every pod, which detaches its datapath and probe SNAT), then unmounts.
func (d *demo) unmountBPFFS() error {
	var errs []error
	// What stays after the last pod, by design: the node-wide proxy
	// cgroup set, removed as an uninstall would.
	if dp, err := datapath.New(datapath.Config{Root: filepath.Join(d.bpffs, "ambpf"), Logger: slog.New(slog.DiscardHandler)}); err != nil {
		errs = append(errs, err)
	} else if err := dp.RemoveNodeState(); err != nil {
		errs = append(errs, err)
	}
	var left []string
	// Only the agent's root: bpffs has files of its own (maps.debug...).
	filepath.WalkDir(filepath.Join(d.bpffs, "ambpf"), func(path string, e os.DirEntry, err error) error {
		if err == nil && !e.IsDir() {
			left = append(left, strings.TrimPrefix(path, d.bpffs+"/"))
		}
		return nil
	})
	if len(left) > 0 {
		errs = append(errs, fmt.Errorf("pins left after the pods were deleted: %s", strings.Join(left, ", ")))
	}
	if err := unix.Unmount(d.bpffs, unix.MNT_DETACH); err != nil {
		errs = append(errs, fmt.Errorf("unmount %s: %w", d.bpffs, err))
	}
	return errors.Join(errs...)
}

// cleanup runs the registered undo steps in reverse and reports failures.
func (d *demo) cleanup() error {
	var errs []error
	var done []string
	for i := len(d.undo) - 1; i >= 0; i-- {
		u := d.undo[i]
		if err := u.fn(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", u.what, err))
			continue
		}
		done = append(done, u.what)
	}
	d.undo = nil
	if len(done) > 0 {
		d.printf("  removed: %s\n", strings.Join(done, ", "))
	}
	return errors.Join(errs...)
}
