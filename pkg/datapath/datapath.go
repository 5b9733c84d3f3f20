//go:build linux

// Package datapath loads, attaches, pins, upgrades and removes ambpf's
// in-pod capture programs: the eBPF replacement for the iptables rules
// Istio ambient writes into every pod.
//
// The capture programs (bpf/capture.c) are loaded once per node and
// shared by every pod; all per-pod state lives in node-wide maps, keyed by
// the pod's index. A pod gets only its entry programs (bpf/podentry.c): a
// few instructions that put its index in the packet's control block and
// tail-call the shared program. Enrolling a pod is therefore a tiny load,
// three link creations and a few map writes, not a verification of the
// whole datapath.
//
// The pins are the state: a Loader keeps no per-pod objects in memory, so
// a new process (a restarted agent, ambpfctl, bpftool) sees exactly what
// is attached, and the datapath keeps working while no process holds it.
// Pin layout:
//
//	<root>/proxy_cgroups                 the proxy processes' cgroups (HASH)
//	<root>/node/capture_progs            the shared programs by slot (PROG_ARRAY), entered by every pod
//	<root>/node/prog_capture_*           the shared programs
//	<root>/node/node_meta                which build the shared programs are (ARRAY, 1 entry)
//	<root>/node/pod_config               per-pod options (ARRAY by pod index)
//	<root>/node/pod_counters             per-pod counters (ARRAY by pod index)
//	<root>/node/pod_meta                 what was attached and changed, per pod; uid "" = free index
//	<root>/node/direct_flows             uncaptured flows of all pods, key has the pod index (HASH)
//	<root>/node/inbound_pending          bypassed inbound SYNs, until the handshake is done (LRU_HASH)
//	<root>/node/dns_nat                  original DNS destinations (LRU_HASH)
//	<root>/pods/<uid>/pod_index          the entry programs' constant: this pod's index
//	<root>/pods/<uid>/link_tc_ingress    tcx link, eth0 ingress   (tcx mode)
//	<root>/pods/<uid>/link_tc_egress     tcx link, eth0 egress    (tcx mode)
//	<root>/pods/<uid>/link_tc_lo_egress  tcx link, lo egress      (tcx mode)
//	<root>/pods/<uid>/prog_entry_*       the entry programs       (clsact mode)
//	<root>/pods/<uid>/link_cgroup_setsockopt  cgroup link, mark guard (with a pod cgroup)
//
// Attach is atomic: the pod's pins are built under <root>/tmp and renamed
// into place only when complete; on any error what was done is undone.
// Mutations hold an flock on <root>; they are short, since no pod
// operation runs the verifier over the capture programs (only the first
// enrolment of a build does).
package datapath

import (
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/bpfobj"
	"github.com/ambpf/ambpf/pkg/cgroup"
	"github.com/ambpf/ambpf/pkg/dpstate"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/pinset"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// DefaultRoot is the bpffs directory holding ambpf's pins.
const DefaultRoot = dpstate.DefaultRoot

// DefaultInterface is the pod device the TC programs attach to.
const DefaultInterface = "eth0"

// Errors a caller can test for with errors.Is.
var (
	ErrAttached    = errors.New("pod already attached")
	ErrNotAttached = errors.New("pod not attached")
	ErrBadUID      = errors.New("invalid pod UID")
	// ErrFull: every pod index of the node is in use (MapSizes.MaxPods).
	ErrFull = errors.New("node datapath full")
)

// Pin names inside a pod's directory.
const (
	pinLinkSockopt = "link_cgroup_setsockopt"
	podsDir        = "pods"
	tmpDir         = "tmp"
	locksDir       = "locks" // one directory per pod being worked on, flocked
)

// Config configures a Loader.
type Config struct {
	// Root is the bpffs directory for pins; DefaultRoot when empty. It
	// must be on a mounted bpffs.
	Root string
	// Mode forces an attach mode; zero takes DetectFeatures' default
	// (clsact on every kernel; tcx only when asked for).
	Mode Mode
	// Sizes are the node-wide map capacities; zero fields take defaults.
	Sizes MapSizes
	// Logger receives progress and decisions; slog.Default() when nil.
	Logger *slog.Logger
}

// The plain data a Loader reports, defined in pkg/dpstate so that clients
// of the agent's API (the CNI plugin, ambpfctl) need not link the loader.
type (
	// Options are the per-pod switches, Istio's pod annotations.
	Options = dpstate.Options
	// Status is a pod's datapath as read from its pins.
	Status = dpstate.Status
	// Attachment is one program attachment of a pod.
	Attachment = dpstate.Attachment
	// Counters are a pod's datapath counters.
	Counters = dpstate.Counters
)

func optionFlags(o Options) captureCfgFlag {
	var f captureCfgFlag
	if o.DNSCapture {
		f |= cfgDNSCapture
	}
	if o.BypassInbound {
		f |= cfgBypassInbound
	}
	return f
}

func optionsFromFlags(f captureCfgFlag) Options {
	return Options{DNSCapture: f&cfgDNSCapture != 0, BypassInbound: f&cfgBypassInbound != 0}
}

// The bits of config.flags (enum cfg_flag in bpf/include/ambpf.h; the
// values come from bpf2go).
const (
	cfgDNSCapture    = captureCfgFlagCFG_DNS_CAPTURE
	cfgBypassInbound = captureCfgFlagCFG_BYPASS_INBOUND
)

// Pod describes a pod to attach to.
type Pod struct {
	// UID names the pod's pin directory: letters, digits, '-', '_', '.'.
	UID string
	// Netns is the pod's network namespace; the caller keeps ownership.
	Netns *netns.NS
	// Interface is the pod's device; DefaultInterface when empty.
	Interface string
	// Cgroup is the pod's cgroup v2 directory. When set, the mark guard
	// is attached there so no process of the pod can set the proxy mark.
	Cgroup string
	Options
}

// Loader attaches and manages pods' datapaths. Its methods are safe for
// concurrent use and across processes (they serialise on an flock).
type Loader struct {
	root      string
	log       *slog.Logger
	feat      Features
	sizes     MapSizes
	spec      *ebpf.CollectionSpec // bpf/capture.c: the node's shared programs
	entrySpec *ebpf.CollectionSpec // bpf/podentry.c: each pod's entry programs
	tag       [8]byte
	nsPaths   sync.Map      // netns.ID -> path it was opened from (rememberNetns)
	freeHint  atomic.Uint32 // a pod index likely free (allocIndex)
	nodeMu    sync.Mutex    // this process's turn at the node lock (lock)
	nodes     nodeCache     // the node's map handles, kept between operations
}

var uidPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`)

// loadSpecs parses both embedded objects, sized as s.
func loadSpecs(s MapSizes) (capture, entry *ebpf.CollectionSpec, err error) {
	if capture, err = loadCapture(); err != nil {
		return nil, nil, fmt.Errorf("load embedded capture programs: %w", err)
	}
	if entry, err = loadPodentry(); err != nil {
		return nil, nil, fmt.Errorf("load embedded pod entry programs: %w", err)
	}
	sizeSpecs(capture, entry, s.withDefaults())
	stripLineAndFuncInfo(entry)
	return capture, entry, nil
}

// stripLineAndFuncInfo drops the source lines and function records of
// spec's programs, so that loading them needs no BTF of their own.
// cilium/ebpf builds and loads a BTF object for each program that carries
// them, and the kernel checks it: for the entry programs, loaded for every
// pod and a few instructions long, that was about a fifth of the cost of
// loading them (docs/BENCHMARKS.md, "Burst enrolment"). Their maps keep
// their BTF, so bpftool still names the pod_index field; what is lost is
// bpftool prog dump's source lines for ten instructions.
func stripLineAndFuncInfo(spec *ebpf.CollectionSpec) {
	for _, p := range spec.Programs {
		for i, ins := range p.Instructions {
			p.Instructions[i] = btf.WithFuncMetadata(ins.WithSource(nil), nil)
		}
	}
}

// New prepares a Loader: checks that Root is on bpffs, creates its
// directories, and detects kernel features. It attaches nothing, and loads
// the node's programs only at the first enrolment (or Verify).
func New(cfg Config) (*Loader, error) {
	root := cfg.Root
	if root == "" {
		root = DefaultRoot
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("remove memlock limit: %w", err)
	}
	if err := bpffs.Check(root); err != nil {
		return nil, err
	}
	for _, d := range []string{root, filepath.Join(root, podsDir), filepath.Join(root, tmpDir), filepath.Join(root, locksDir)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	feat, err := DetectFeatures()
	if err != nil {
		return nil, err
	}
	if feat.ReusePortErr != nil {
		log.Warn("SO_REUSEPORT steering probe failed: taken as unsupported, so proxies are told to listen without SO_REUSEPORT", "err", feat.ReusePortErr)
	} else {
		log.Info("SO_REUSEPORT steering probed", "supported", feat.ReusePortAssign)
	}
	if cfg.Mode != 0 {
		feat.Mode = cfg.Mode
	}
	sizes := cfg.Sizes.withDefaults()
	spec, entrySpec, err := loadSpecs(sizes)
	if err != nil {
		return nil, err
	}
	l := &Loader{root: root, log: log, feat: feat, sizes: sizes, spec: spec, entrySpec: entrySpec, tag: ProgramTag()}
	unlock, err := l.lock()
	if err != nil {
		return nil, err
	}
	err = l.ensureProxyCgroups()
	unlock()
	if err != nil {
		return nil, err
	}
	log.Info("datapath ready", "root", root, "features", feat.String(), "max_pods", sizes.MaxPods)
	return l, nil
}

// ProgramTag identifies the embedded build of the programs: the first bytes
// of the SHA-256 of both object files. Pods attached with another build
// are upgraded by Verify.
func ProgramTag() [8]byte {
	return bpfobj.Tag(append(append([]byte{}, _CaptureBytes...), _PodentryBytes...))
}

// Features reports the mechanisms this Loader uses.
func (l *Loader) Features() Features { return l.feat }

// Root is the bpffs directory holding the pins.
func (l *Loader) Root() string { return l.root }

// PodDir is where a pod's pins live.
func (l *Loader) PodDir(uid string) string { return filepath.Join(l.root, podsDir, uid) }

// Locking: a pod's operations hold its own lock (lockPod), so enrolments of
// different pods run in parallel. The node lock (lock, an flock on the
// root) is held only for short node-wide steps: loading or swapping the
// node's programs, taking a pod index, sweeping. Pod locks are always
// taken before the node lock; whoever holds the node lock only tries pod
// locks, never waits for one, so the two cannot deadlock.

// lock takes the exclusive cross-process node lock on the root directory.
// Callers in this process queue on a mutex first, so only one of them at a
// time waits in flock: a burst of enrolments had every waiter blocked in
// the flock system call, each holding an OS thread, and the holder
// waiting behind them for a CPU, so the lock was held many times longer
// than its work (nine tenths of the burst's blocked time was flock;
// docs/BENCHMARKS.md, "Burst enrolment"). Parked goroutines hold no thread.
func (l *Loader) lock() (unlock func(), err error) {
	l.nodeMu.Lock()
	unlockRoot, err := bpffs.Lock(l.root)
	if err != nil {
		l.nodeMu.Unlock()
		return nil, err
	}
	return func() { unlockRoot(); l.nodeMu.Unlock() }, nil
}

// lockPod takes uid's lock, waiting for another holder.
func (l *Loader) lockPod(uid string) (*bpffs.NameLock, error) {
	return bpffs.LockName(filepath.Join(l.root, locksDir), uid)
}

// lockAttached takes the lock of an attached pod: ErrNotAttached, and no
// lock left behind, when there is no such pod.
func (l *Loader) lockAttached(uid string) (*bpffs.NameLock, error) {
	if !exists(l.PodDir(uid)) {
		return nil, fmt.Errorf("%s: %w", uid, ErrNotAttached)
	}
	pl, err := l.lockPod(uid)
	if err != nil {
		return nil, err
	}
	if !exists(l.PodDir(uid)) { // detached while we waited
		pl.Unlock(true)
		return nil, fmt.Errorf("%s: %w", uid, ErrNotAttached)
	}
	return pl, nil
}

// tryLockPod takes uid's lock unless someone holds it (bpffs.ErrBusy).
func (l *Loader) tryLockPod(uid string) (*bpffs.NameLock, error) {
	return bpffs.TryLockName(filepath.Join(l.root, locksDir), uid)
}

// nodeReady makes sure the node runs this build's programs, and returns
// its maps; with alloc, it also reserves a pod index for uid. It holds the
// node lock only for that.
func (l *Loader) nodeReady(uid string, alloc bool) (n *nodeMaps, idx uint32, err error) {
	unlock, err := l.lock()
	if err != nil {
		return nil, 0, err
	}
	defer unlock()
	// The usual case, this build running: the open handles say so.
	if n, err = l.openNode(); err == nil && !n.current(l) {
		n.Close()
		n = nil
	}
	if n == nil {
		if err := l.ensureNode(); err != nil {
			return nil, 0, err
		}
		if n, err = l.openNode(); err != nil {
			return nil, 0, err
		}
	}
	if alloc {
		if idx, err = n.allocIndex(uid, l.sizes.MaxPods, &l.freeHint); err != nil {
			n.Close()
			return nil, 0, err
		}
	}
	return n, idx, nil
}

// objects are one loaded instance of the shared capture programs and maps.
type objects struct {
	captureObjects
}

// load creates the capture programs, reusing the maps in replace when
// given (the node's pinned maps) or creating fresh ones.
func (l *Loader) load(replace map[string]*ebpf.Map) (*objects, error) {
	var o objects
	// Maps pinned by name in the C source (proxy_cgroups) are node-wide:
	// opened at the root when there, created and pinned there otherwise.
	opts := &ebpf.CollectionOptions{MapReplacements: replace, Maps: ebpf.MapOptions{PinPath: l.root}}
	if err := loadNodeBody(l.spec, &o, opts); err != nil {
		return nil, err
	}
	return &o, nil
}

func (o *objects) mapsByName() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{
		captureMapPodConfig:      o.PodConfig,
		captureMapPodCounters:    o.PodCounters,
		captureMapPodMeta:        o.PodMeta,
		captureMapDirectFlows:    o.DirectFlows,
		captureMapInboundPending: o.InboundPending,
		captureMapDnsNat:         o.DnsNat,
		captureMapNodeMeta:       o.NodeMeta,
	}
}

// Attach enrols a pod: takes a pod index, loads the pod's entry programs,
// prepares the pod's routing and sysctls, attaches the TC entry programs to
// the pod's device and lo (and the mark guard to its cgroup), records the
// flows already open so they keep flowing, and pins it all. The node's
// shared programs are loaded first if this build's are not there yet.
// Either all of it is in place when Attach returns nil, or none of it is. A
// pod already attached gives ErrAttached; a node with every index in use,
// ErrFull.
func (l *Loader) Attach(p Pod) (st Status, err error) {
	if !uidPattern.MatchString(p.UID) {
		return Status{}, fmt.Errorf("%w: %q", ErrBadUID, p.UID)
	}
	if p.Netns == nil {
		return Status{}, fmt.Errorf("attach %s: no network namespace given", p.UID)
	}
	if p.Interface == "" {
		p.Interface = DefaultInterface
	}
	start := time.Now()
	nsid, err := p.Netns.ID()
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
	}
	pl, err := l.lockPod(p.UID)
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
	}
	final := l.PodDir(p.UID)
	// The lock's directory goes with a pod that did not come to be.
	defer func() { pl.Unlock(err != nil && !exists(final)) }()
	if exists(final) {
		return l.reattach(p, nsid)
	}
	n, idx, err := l.nodeReady(p.UID, true)
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
	}
	defer n.Close()
	stage, err := pinset.NewStage(filepath.Join(l.root, tmpDir), p.UID+"-")
	if err != nil {
		n.release(idx)
		return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
	}
	tmp := stage.Dir()
	var (
		e      *entry
		links  []link.Link
		info   capturePodInfo
		netSet bool
		qdisc  bool
		// nl is a netlink handle of the pod's netns, made inside it once
		// for every request of the enrolment: one socket, not one per
		// request, and usable from any thread (no netns entry needed).
		nl *netlink.Handle
	)
	defer func() {
		if nl != nil {
			nl.Close() // after the undo below, which uses it
		}
	}()
	// Undo on failure, last step first (the staged pins go before): the
	// links are detached explicitly, the netns changes recorded in info
	// reverted, our handles closed, and the pod's index and node entries
	// released.
	stage.OnUndo(func() error { return n.release(idx) })
	stage.OnUndo(func() error { e.Close(); return nil })
	stage.OnUndo(func() error {
		if !netSet && !qdisc {
			return nil
		}
		return p.Netns.Do(func() error {
			var errs []error
			if qdisc {
				errs = append(errs, clsactDetach(tcattach.On(nl), &info))
			}
			if netSet {
				errs = append(errs, teardownNetns(nl, &info, p.Interface))
			}
			return errors.Join(errs...)
		})
	})
	stage.OnUndo(func() error {
		var errs []error
		for _, lk := range links {
			errs = append(errs, lk.Detach(), lk.Close())
		}
		return errors.Join(errs...)
	})
	defer func() { err = stage.Abort(err) }()

	e, err = l.loadEntry(n, idx, p.Cgroup != "")
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
	}
	if err := e.index.Pin(filepath.Join(tmp, pinPodIndex)); err != nil {
		return Status{}, fmt.Errorf("attach %s: pin %s: %w", p.UID, pinPodIndex, err)
	}
	if err := n.config.Put(idx, l.podConfig(p.Options, 0)); err != nil {
		return Status{}, fmt.Errorf("attach %s: write config: %w", p.UID, err)
	}
	if err := n.counters.Put(idx, captureCounters{}); err != nil {
		return Status{}, fmt.Errorf("attach %s: reset counters: %w", p.UID, err)
	}

	bpffs.CopyCString(info.Uid[:], p.UID)
	bpffs.CopyCString(info.Ifname[:], p.Interface)
	info.NetnsDev, info.NetnsIno = nsid.Dev, nsid.Ino
	info.Mode = captureTcMode(l.feat.Mode)
	info.ProgramTag = l.tag
	info.AttachedUnixNs = uint64(time.Now().UnixNano())

	// Flows open in the pod are recorded after attaching, so no flow can
	// slip between the snapshot and the programs: a flow opened meanwhile
	// is in the snapshot. It runs in the pod's netns.
	recordOpen := func() error {
		stored, err := recordPreexisting(n.flows, idx, l.sizes.DirectFlowsPerPod, l.log)
		if err == nil && stored > 0 {
			err = n.adjustDirect(idx, int64(stored))
		}
		return err
	}
	// In clsact mode the whole enrolment inside the pod is this one entry
	// into its netns.
	err = p.Netns.Do(func() error {
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return fmt.Errorf("netlink socket: %w", err)
		}
		nl = h
		tc := tcattach.On(nl)
		ifindex, err := tc.InterfaceIndex(p.Interface)
		if err != nil {
			return err
		}
		info.Ifindex = uint32(ifindex)
		if err := setupNetns(nl, &info, p.Interface); err != nil {
			return err
		}
		netSet = true
		// Record what was changed before attaching, so a crash from
		// here on leaves enough in the node's meta to clean up.
		if err := n.meta.Put(idx, info); err != nil {
			return fmt.Errorf("write pod meta: %w", err)
		}
		switch l.feat.Mode {
		case ModeTCX:
			return nil // below: the links are made concurrently
		case ModeClsact:
			qdisc = true
			if err := clsactAttach(tc, &info, ifindex, e); err != nil {
				return err
			}
			return recordOpen()
		default:
			return fmt.Errorf("unknown attach mode %v", l.feat.Mode)
		}
	})
	if err == nil && l.feat.Mode == ModeTCX {
		var ls []link.Link
		ls, err = tcattach.AttachTCXIn(p.Netns, hooks.TC(int(info.Ifindex), e.get))
		links = append(links, ls...)
		if err == nil {
			err = p.Netns.Do(recordOpen)
		}
	}
	if err != nil {
		return Status{}, fmt.Errorf("attach %s in netns: %w", p.UID, err)
	}
	if p.Cgroup != "" {
		cg, err := link.AttachCgroup(link.CgroupOptions{Path: p.Cgroup, Attach: ebpf.AttachCGroupSetsockopt, Program: e.guard})
		if err != nil {
			return Status{}, fmt.Errorf("attach %s: mark guard on cgroup %s: %w", p.UID, p.Cgroup, err)
		}
		links = append(links, cg)
		id, err := cgroup.ID(p.Cgroup)
		if err != nil {
			return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
		}
		info.CgroupId = id
		if err := cg.Pin(filepath.Join(tmp, pinLinkSockopt)); err != nil {
			return Status{}, fmt.Errorf("attach %s: pin cgroup link: %w", p.UID, err)
		}
	}
	if l.feat.Mode == ModeTCX {
		// The TC links first: links[i] is hook i, the cgroup link after.
		if err := hooks.PinLinks(tmp, links[:len(hooks.Hooks)]); err != nil {
			return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
		}
	} else if err := hooks.PinPrograms(tmp, e.get); err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
	}
	if err := n.meta.Put(idx, info); err != nil {
		return Status{}, fmt.Errorf("attach %s: write pod meta: %w", p.UID, err)
	}
	// The status is read back from the pins, but for the filters, which
	// are known from here.
	var filters map[string]uint32
	if l.feat.Mode == ModeClsact {
		if filters, err = hooks.FilterPrograms(e.get); err != nil {
			return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
		}
	}
	if err := stage.Publish(final); err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
	}
	// The pins hold everything now; our handles can go.
	for _, lk := range links {
		lk.Close()
	}
	e.Close()
	l.log.Info("pod attached", "uid", p.UID, "index", idx, "interface", p.Interface, "mode", l.feat.Mode.String(),
		"dns_capture", p.DNSCapture, "bypass_inbound", p.BypassInbound, "cgroup", p.Cgroup,
		"took", time.Since(start))
	l.rememberNetns(nsid, p.Netns)
	return l.statusIn(p.UID, filters)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// reattach brings an attached pod up to date; the caller holds its lock.
func (l *Loader) reattach(p Pod, nsid netns.ID) (Status, error) {
	rec, err := l.record(l.PodDir(p.UID))
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
	}
	if rec.info.NetnsDev != nsid.Dev || rec.info.NetnsIno != nsid.Ino {
		return Status{}, fmt.Errorf("attach %s: %w in another network namespace", p.UID, ErrAttached)
	}
	if rec.legacy || rec.info.ProgramTag != l.tag {
		if err := l.upgrade(p.UID); err != nil {
			return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
		}
	}
	if err := l.setOptions(p.UID, p.Options); err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
	}
	l.log.Info("pod already attached, brought up to date", "uid", p.UID)
	return l.status(p.UID)
}

// podRecord is what the pins say of a pod directory.
type podRecord struct {
	index  uint32
	info   capturePodInfo
	legacy bool // attached by a build with per-pod programs and maps (see legacy.go)
}

// record reads a pod directory's record: its index from the pod_index pin
// and its meta from the node, or, for a pod a per-pod build attached, the
// meta pinned in the directory.
func (l *Loader) record(dir string) (podRecord, error) {
	if isLegacy(dir) {
		info, err := readLegacyMeta(dir)
		return podRecord{info: info, legacy: true}, err
	}
	idx, err := l.readPodIndex(dir)
	if err != nil {
		return podRecord{}, notAttached(err)
	}
	n, err := l.openNode()
	if err != nil {
		return podRecord{}, err
	}
	defer n.Close()
	var info capturePodInfo
	if err := n.meta.Lookup(idx, &info); err != nil {
		return podRecord{}, fmt.Errorf("read %s[%d]: %w", captureMapPodMeta, idx, err)
	}
	return podRecord{index: idx, info: info}, nil
}

// SetOptions changes a pod's options in place; new packets see them at once.
func (l *Loader) SetOptions(uid string, opts Options) error {
	if !uidPattern.MatchString(uid) {
		return fmt.Errorf("%w: %q", ErrBadUID, uid)
	}
	pl, err := l.lockAttached(uid)
	if err != nil {
		return fmt.Errorf("set options: %w", err)
	}
	unlock := pl.Unlock
	defer unlock(false)
	return l.setOptions(uid, opts)
}

func (l *Loader) setOptions(uid string, opts Options) error {
	rec, err := l.record(l.PodDir(uid))
	if err != nil {
		return fmt.Errorf("set options %s: %w", uid, err)
	}
	if rec.legacy {
		return fmt.Errorf("set options %s: attached by a per-pod build, upgrade it first", uid)
	}
	n, err := l.openNode()
	if err != nil {
		return fmt.Errorf("set options %s: %w", uid, err)
	}
	defer n.Close()
	var cfg captureConfig
	if err := n.config.Lookup(rec.index, &cfg); err != nil {
		return fmt.Errorf("set options %s: read %s[%d]: %w", uid, captureMapPodConfig, rec.index, err)
	}
	if err := n.config.Put(rec.index, l.podConfig(opts, cfg.DirectAdjust)); err != nil {
		return fmt.Errorf("set options %s: write %s[%d]: %w", uid, captureMapPodConfig, rec.index, err)
	}
	return nil
}

// podConfig is a pod's pod_config entry: its options, its share of
// direct_flows, and the loader's part of its count there (adjust).
func (l *Loader) podConfig(opts Options, adjust int64) captureConfig {
	return captureConfig{Flags: optionFlags(opts), DirectMax: l.sizes.DirectFlowsPerPod, DirectAdjust: adjust}
}

func notAttached(err error) error { return bpffs.MissingAs(err, ErrNotAttached) }

// Detach removes a pod's datapath: links and filters, pins, its entries in
// the node's maps, and the rules, routes and sysctls Attach set (when the
// pod's netns still exists; it is found by its identity in the pod's
// meta). Detaching a pod that is not attached gives ErrNotAttached.
func (l *Loader) Detach(uid string) error {
	if !uidPattern.MatchString(uid) {
		return fmt.Errorf("%w: %q", ErrBadUID, uid)
	}
	pl, err := l.lockAttached(uid)
	if err != nil {
		return fmt.Errorf("detach: %w", err)
	}
	defer pl.Unlock(true)
	dir := l.PodDir(uid)
	if err := l.detachDir(dir); err != nil {
		return fmt.Errorf("detach %s: %w", uid, err)
	}
	l.log.Info("pod detached", "uid", uid)
	return nil
}

// detachDir undoes one pod directory, final or temporary.
func (l *Loader) detachDir(dir string) error {
	var errs []error
	rec, rerr := l.record(dir)
	info := rec.info
	if rerr == nil && (info.Setup != 0 || hasSysctls(&info) || Mode(info.Mode) == ModeClsact) {
		ns, err := l.findNetns(netns.ID{Dev: info.NetnsDev, Ino: info.NetnsIno})
		switch {
		case err == nil:
			errs = append(errs, inNetns(ns, func(nl *netlink.Handle) error {
				var e []error
				if Mode(info.Mode) == ModeClsact {
					e = append(e, clsactDetach(tcattach.On(nl), &info))
				}
				e = append(e, teardownNetns(nl, &info, bpffs.CString(info.Ifname[:])))
				return errors.Join(e...)
			}))
			ns.Close()
		case errors.Is(err, errNetnsGone):
			// Nothing to undo: the routes, sysctls and filters went with it.
		default:
			errs = append(errs, err)
		}
	}
	// Detach explicitly: dropping the last reference to a link (unpinning)
	// releases it from a workqueue, so traffic would stay captured for a
	// moment after Detach returned.
	entries, err := os.ReadDir(dir)
	if err != nil {
		errs = append(errs, err)
	}
	var pins []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "link_") {
			pins = append(pins, filepath.Join(dir, e.Name()))
		}
	}
	errs = append(errs, tcattach.DetachPinnedAll(pins))
	if rerr == nil && !rec.legacy {
		n, err := l.openNode()
		if err == nil {
			if err = n.release(rec.index); err == nil {
				l.freeHint.Store(rec.index)
			}
			n.Close()
		}
		errs = append(errs, err)
	}
	errs = append(errs, os.RemoveAll(dir))
	return errors.Join(errs...)
}

func hasSysctls(info *capturePodInfo) bool {
	for _, v := range info.OrigSysctl {
		if v >= 0 {
			return true
		}
	}
	return false
}

// List returns every attached pod, sorted by UID.
func (l *Loader) List() ([]Status, error) {
	entries, err := os.ReadDir(filepath.Join(l.root, podsDir))
	if err != nil {
		return nil, fmt.Errorf("list pods: %w", err)
	}
	var out []Status
	for _, e := range entries {
		st, err := l.status(e.Name())
		if errors.Is(err, ErrNotAttached) {
			continue // detached meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].UID < out[j].UID })
	return out, nil
}

// Get returns one pod's status, or ErrNotAttached.
func (l *Loader) Get(uid string) (Status, error) {
	if !uidPattern.MatchString(uid) {
		return Status{}, fmt.Errorf("%w: %q", ErrBadUID, uid)
	}
	return l.status(uid)
}

// Upgrade brings a pod to this build: the node's shared programs are
// swapped for this build's if they are another's (for every pod at once,
// through capture_progs), and the pod's entry programs are replaced in
// place: tcx links updated, clsact filters replaced, so no packet is
// processed by neither version. The pod keeps its index, state and
// counters. A pod a per-pod build attached is migrated (legacy.go).
func (l *Loader) Upgrade(uid string) error {
	if !uidPattern.MatchString(uid) {
		return fmt.Errorf("%w: %q", ErrBadUID, uid)
	}
	pl, err := l.lockAttached(uid)
	if err != nil {
		return fmt.Errorf("upgrade: %w", err)
	}
	defer pl.Unlock(false)
	return l.upgrade(uid)
}

// upgrade brings one pod to this build; the caller holds the pod's lock
// and not the node lock.
func (l *Loader) upgrade(uid string) (err error) {
	dir := l.PodDir(uid)
	if isLegacy(dir) {
		return l.migrateLegacy(uid)
	}
	rec, err := l.record(dir)
	if err != nil {
		return fmt.Errorf("upgrade %s: %w", uid, err)
	}
	n, _, err := l.nodeReady(uid, false)
	if err != nil {
		return fmt.Errorf("upgrade %s: %w", uid, err)
	}
	defer n.Close()
	_, serr := os.Stat(filepath.Join(dir, pinLinkSockopt))
	guard := serr == nil
	e, err := l.loadEntry(n, rec.index, guard)
	if err != nil {
		return fmt.Errorf("upgrade %s: %w", uid, err)
	}
	defer e.Close()
	info := rec.info
	if err := l.swapEntry(dir, &info, e, guard); err != nil {
		return fmt.Errorf("upgrade %s: %w", uid, err)
	}
	if err := bpffs.PinReplacing(e.index, filepath.Join(dir, pinPodIndex)); err != nil {
		return fmt.Errorf("upgrade %s: %w", uid, err)
	}
	// This loader's share of direct_flows for the pod.
	var cfg captureConfig
	if err := n.config.Lookup(rec.index, &cfg); err != nil {
		return fmt.Errorf("upgrade %s: read config: %w", uid, err)
	}
	if err := n.config.Put(rec.index, l.podConfig(optionsFromFlags(cfg.Flags), cfg.DirectAdjust)); err != nil {
		return fmt.Errorf("upgrade %s: write config: %w", uid, err)
	}
	info.ProgramTag = l.tag
	if err := n.meta.Put(rec.index, info); err != nil {
		return fmt.Errorf("upgrade %s: write meta: %w", uid, err)
	}
	l.log.Info("pod upgraded", "uid", uid, "program_tag", hex.EncodeToString(l.tag[:]))
	return nil
}

// swapEntry makes the pod's hooks run e's programs, hook by hook in table
// order: tcx links updated in place, clsact filters replaced atomically
// (and their pins renamed over the old ones), the cgroup link updated
// when guard.
func (l *Loader) swapEntry(dir string, info *capturePodInfo, e *entry, guard bool) error {
	switch Mode(info.Mode) {
	case ModeTCX:
		if err := hooks.Update(tcattach.TC{}, ModeTCX, dir, int(info.Ifindex), e.get, false); err != nil {
			return err
		}
	case ModeClsact:
		ns, err := l.findNetns(netns.ID{Dev: info.NetnsDev, Ino: info.NetnsIno})
		if err != nil {
			return err
		}
		err = inNetns(ns, func(nl *netlink.Handle) error { return clsactAttach(tcattach.On(nl), info, int(info.Ifindex), e) })
		ns.Close()
		if err != nil {
			return err
		}
		if err := hooks.PinPrograms(dir, e.get); err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown attach mode %d", info.Mode)
	}
	if guard {
		return bpffs.UpdatePinnedLink(filepath.Join(dir, pinLinkSockopt), e.guard)
	}
	return nil
}

// migrateMap creates the map of spec and carries old's entries over, for
// an upgrade from a build whose layout or size differs. Values keep their
// leading bytes (struct fields are only ever appended, as in struct
// counters); direct_flows entries of builds before expiry (value 1) become
// attach-time flows with a fresh expiry. Entries that no longer fit are
// left out.
func migrateMap(spec *ebpf.MapSpec, old *ebpf.Map) (*ebpf.Map, error) {
	var value func([]byte) any
	if spec.Name == captureMapDirectFlows && old.ValueSize() == 8 {
		value = func([]byte) any {
			return captureDirectFlow{ExpiresNs: monotonicNow() + uint64(directIdle), Origin: directAttached}
		}
	}
	return bpfobj.MigrateMap(spec, old, value)
}

// VerifyResult is what Verify found and did for one pod.
type VerifyResult struct {
	UID    string
	Action string // "ok", "upgraded", "removed", "broken"
	Reason string
}

// Verify checks every pinned pod, for use when a process starts: a pod
// whose network namespace is gone is removed, one attached with another
// build is upgraded (the node's shared programs first), one missing an
// attachment is reported broken (the caller re-enrols it). Leftovers of an
// attach that never finished are removed, pod indexes no pod holds are
// freed, and expired direct flows deleted (ExpireFlows).
func (l *Loader) Verify() ([]VerifyResult, error) {
	tmps, err := os.ReadDir(filepath.Join(l.root, tmpDir))
	if err != nil {
		return nil, fmt.Errorf("verify: %w", err)
	}
	entries, err := os.ReadDir(filepath.Join(l.root, podsDir))
	if err != nil {
		return nil, fmt.Errorf("verify: %w", err)
	}
	// The node's programs first: swapped for this build's (or resized)
	// for every pod at once.
	if exists(l.nodeDir()) || len(entries) > 0 {
		n, _, err := l.nodeReady("", false)
		if err != nil {
			return nil, fmt.Errorf("verify: %w", err)
		}
		n.Close()
	}
	var errs []error
	for _, t := range tmps {
		// <uid>-<random>: an attach in progress holds uid's lock.
		uid := t.Name()[:max(strings.LastIndex(t.Name(), "-"), 0)]
		pl, err := l.tryLockPod(uid)
		if err != nil {
			continue
		}
		l.log.Warn("removing an unfinished attach", "dir", t.Name())
		errs = append(errs, l.detachDir(filepath.Join(l.root, tmpDir, t.Name())))
		pl.Unlock(!exists(l.PodDir(uid)))
	}
	var out []VerifyResult
	for _, e := range entries {
		uid := e.Name()
		pl, err := l.tryLockPod(uid)
		if err != nil {
			// Another process is changing it right now.
			out = append(out, VerifyResult{UID: uid, Action: "ok", Reason: "busy: " + err.Error()})
			continue
		}
		out = append(out, l.verifyPod(uid))
		pl.Unlock(!exists(l.PodDir(uid)))
	}
	if exists(l.nodeDir()) {
		errs = append(errs, l.sweepNode())
	}
	return out, errors.Join(errs...)
}

// verifyPod is Verify for one pod, whose lock the caller holds.
func (l *Loader) verifyPod(uid string) VerifyResult {
	res := VerifyResult{UID: uid, Action: "ok"}
	st, err := l.status(uid)
	switch {
	case err != nil:
		res.Action, res.Reason = "broken", err.Error()
	case !st.NetnsAlive:
		res.Action, res.Reason = "removed", "network namespace gone"
		if err := l.detachDir(l.PodDir(uid)); err != nil {
			res.Action, res.Reason = "broken", err.Error()
		}
	case !st.Attached():
		res.Action, res.Reason = "broken", "a program is not attached: "+st.Missing()
	case !st.Current:
		res.Action, res.Reason = "upgraded", "program build "+st.ProgramTag+" replaced"
		if err := l.upgrade(uid); err != nil {
			res.Action, res.Reason = "broken", err.Error()
		}
	}
	l.log.Info("verified pod", "uid", uid, "action", res.Action, "reason", res.Reason)
	return res
}

// sweepNode frees the pod indexes whose pod directory is gone (an attach
// or detach that crashed half-way) and deletes expired direct flows.
func (l *Loader) sweepNode() error {
	unlock, err := l.lock()
	if err != nil {
		return err
	}
	defer unlock()
	n, err := l.openNode()
	if err != nil {
		return fmt.Errorf("sweep node: %w", err)
	}
	defer n.Close()
	metas, err := n.allMeta()
	if err != nil {
		return fmt.Errorf("sweep node: %w", err)
	}
	for i := uint32(0); int(i) < len(metas); i++ {
		uid := bpffs.CString(metas[i].Uid[:])
		if uid == "" {
			continue
		}
		if idx, err := l.readPodIndex(l.PodDir(uid)); err == nil && idx == i {
			continue
		}
		// An attach or migration in progress holds the pod's lock.
		pl, err := l.tryLockPod(uid)
		if err != nil {
			continue
		}
		l.log.Warn("freeing a pod index no pod holds", "index", i, "uid", uid)
		err = n.release(i)
		pl.Unlock(!exists(l.PodDir(uid)))
		if err != nil {
			return fmt.Errorf("sweep node: %w", err)
		}
	}
	// Expired direct flows, pod by pod under each pod's lock (a busy pod
	// is left for the next sweep).
	now := monotonicNow()
	for i := uint32(0); int(i) < len(metas); i++ {
		uid := bpffs.CString(metas[i].Uid[:])
		if uid == "" {
			continue
		}
		pl, err := l.tryLockPod(uid)
		if err != nil {
			continue
		}
		nexp, err := n.expirePod(i, now)
		pl.Unlock(!exists(l.PodDir(uid)))
		if err != nil {
			return fmt.Errorf("sweep node: %w", err)
		}
		if nexp > 0 {
			l.log.Info("expired direct flows", "uid", uid, "flows", nexp)
		}
	}
	return nil
}
