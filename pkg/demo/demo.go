//go:build linux

// Package demo shows ambpf's eBPF datapath capturing real traffic: it
// builds a node with three pods on a bridge (pkg/netlab), enrols two of
// them with the datapath, runs connections that exercise each rule Istio's
// in-pod iptables rules implement, prints what happened to each, shows the
// pods' counters and the empty iptables/nft rule sets, and removes
// everything again.
//
// Until the real in-pod proxy exists, the proxy in each enrolled pod is
// pkg/testproxy, a pass-through stand-in that records what it accepted.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/netlab"
	"github.com/ambpf/ambpf/pkg/testproxy"
)

// Defaults of Config.
const (
	DefaultPrefix   = "ambpf-demo-"
	DefaultStateDir = "/run/ambpf-demo"
)

// The demo's pods. The first two are enrolled.
const (
	podA       = "app-a"
	podB       = "app-b"
	podOutside = "outside"
)

// enrolled lists the enrolled pods in the order their proxies are reported.
var enrolled = []string{podA, podB}

// Config configures Run.
type Config struct {
	// Prefix starts the name of every network namespace and cgroup the
	// demo creates; DefaultPrefix when empty.
	Prefix string
	// StateDir holds the demo's private bpffs mount (a fresh directory
	// per run below it); DefaultStateDir when empty.
	StateDir string
	// Out receives the progress lines and results; os.Stdout when nil.
	Out io.Writer
	// Logger receives the datapath's and proxies' logs; discarded when nil.
	Logger *slog.Logger
}

// demo is one run's state; cleanup undoes it in reverse.
type demo struct {
	cfg     Config
	out     io.Writer
	log     *slog.Logger
	bpffs   string
	lab     *netlab.Lab
	loader  *datapath.Loader
	proxies map[string]*testproxy.Proxy
	failed  []string

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

const numSteps = 5

// Run runs the demo: build, enrol, traffic, inspect, clean up, with one
// progress line per step on cfg.Out. It needs root. Whatever happens (a
// failed check, an error, ctx cancelled by a signal) everything it
// created is removed before it returns. It returns an error when a check
// failed, a step failed or ctx was cancelled.
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
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if os.Geteuid() != 0 {
		return errors.New("the demo needs root: it creates network namespaces and loads BPF programs")
	}
	d := &demo{cfg: cfg, out: cfg.Out, log: cfg.Logger, proxies: map[string]*testproxy.Proxy{}}
	defer func() {
		d.step(numSteps, "Clean up: detach, stop proxies and apps, delete netns and cgroups, unmount bpffs")
		if cerr := d.cleanup(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", cerr))
			d.printf("  cleanup FAILED: %v\n", cerr)
		} else {
			d.printf("  nothing left behind\n")
		}
		if err != nil {
			d.printf("\nDEMO FAILED: %v\n", err)
		} else {
			d.printf("\nDemo passed: every connection took the path the datapath contract requires.\n")
		}
	}()
	steps := []struct {
		title string
		fn    func(context.Context) error
	}{
		{"Build: private bpffs, node bridge, pods app-a and app-b (enrolled) and outside (not enrolled)", d.build},
		{"Enrol: test proxies and app servers, then attach the eBPF datapath to app-a and app-b", d.enrol},
		{"Traffic: one connection per rule, with the path it took", d.traffic},
		{"Inspect: datapath mode, counters, pinned map, rules in app-a", d.inspect},
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
			return err
		}
	}
	if len(d.failed) > 0 {
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
	}
}

// build mounts the private bpffs and creates the lab.
func (d *demo) build(context.Context) error {
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
	d.onCleanup("bpffs mount", func() error {
		if err := unix.Unmount(d.bpffs, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount %s: %w", d.bpffs, err)
		}
		return nil
	})
	d.printf("  bpffs mounted at %s\n", d.bpffs)

	lab, err := netlab.Build(netlab.Options{Prefix: d.cfg.Prefix, Pods: []string{podA, podB, podOutside}})
	if err != nil {
		return err
	}
	d.lab = lab
	d.onCleanup("network namespaces and cgroups", lab.Close)
	d.printf("  node          netns %s  br0 %s/24 %s/64, probe source %s\n",
		lab.Node.NSName, netlab.BridgeV4, netlab.BridgeV6, meshconst.ProbeSourceV4)
	for _, p := range lab.Pods {
		d.printf("  pod %-9s netns %s  eth0 %s %s\n", p.Name, p.NSName, p.IPv4, p.IPv6)
	}
	return nil
}

// enrol starts the proxies and apps and attaches the datapath.
func (d *demo) enrol(context.Context) error {
	for _, name := range enrolled {
		p := d.lab.PodNamed(name)
		px, err := testproxy.Start(p.NS, testproxy.Options{DNS: name == podA, Logger: d.log})
		if err != nil {
			return fmt.Errorf("proxy in %s: %w", name, err)
		}
		d.proxies[name] = px
		d.onCleanup("proxy "+name, px.Close)
	}
	d.printf("  test proxy (pkg/testproxy: a stand-in until ambpf-proxy exists) in app-a and app-b:\n")
	d.printf("    listeners :15001 :15006 :15008, socket mark 0x539, IP_TRANSPARENT; app-a also DNS on 127.0.0.1/::1 :15053\n")
	for _, p := range d.lab.Pods {
		g, err := startGreeter(&p.Netns, p.Name)
		if err != nil {
			return err
		}
		d.onCleanup("app "+p.Name, g.Close)
	}
	d.printf("  app servers on [::]:%d in every pod, answering \"app=<pod> peer=<address the app saw>\"\n", appPort)

	l, err := datapath.New(datapath.Config{Root: filepath.Join(d.bpffs, "ambpf"), Logger: d.log})
	if err != nil {
		return err
	}
	d.loader = l
	for _, name := range enrolled {
		p := d.lab.PodNamed(name)
		cg, err := p.Cgroup()
		if err != nil {
			return err
		}
		opts := datapath.Options{DNSCapture: name == podA}
		st, err := l.Attach(datapath.Pod{UID: name, Netns: p.NS, Cgroup: cg, Options: opts})
		if err != nil {
			return err
		}
		d.onCleanup("datapath "+name, func() error { return l.Detach(name) })
		var hooks []string
		for _, a := range st.Attachments {
			hooks = append(hooks, a.Hook)
		}
		d.printf("  attached %s (dns capture %v): %s\n", name, opts.DNSCapture, strings.Join(hooks, ", "))
	}
	return nil
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
