//go:build linux

// Package datapath loads, attaches, pins, upgrades and removes ambpf's
// in-pod capture programs (bpf/capture.c): the eBPF replacement for the
// iptables rules Istio ambient writes into every pod.
//
// Each pod gets its own instance of the programs and maps, pinned under
// <root>/pods/<uid>/ in bpffs. The pins are the state: a Loader keeps no
// per-pod objects in memory, so a new process (a restarted agent, ambpfctl,
// bpftool) sees exactly what is attached, and the datapath keeps working
// while no process holds it. Pin layout:
//
//	<root>/pods/<uid>/pod_config              per-pod options (ARRAY, 1 entry)
//	<root>/pods/<uid>/pod_counters            counters (ARRAY, 1 entry)
//	<root>/pods/<uid>/pod_meta                what was attached and changed (ARRAY, 1 entry)
//	<root>/pods/<uid>/direct_flows            uncaptured flows: open at attach, bypassed inbound (HASH)
//	<root>/pods/<uid>/inbound_pending         bypassed inbound SYNs, until the handshake is done (LRU_HASH)
//	<root>/pods/<uid>/dns_nat                 original DNS destinations (LRU_HASH)
//	<root>/pods/<uid>/link_tc_ingress         tcx link, eth0 ingress   (tcx mode)
//	<root>/pods/<uid>/link_tc_egress          tcx link, eth0 egress    (tcx mode)
//	<root>/pods/<uid>/link_tc_lo_egress       tcx link, lo egress      (tcx mode)
//	<root>/pods/<uid>/prog_*                  the programs             (clsact mode)
//	<root>/pods/<uid>/link_cgroup_setsockopt  cgroup link, mark guard  (with a pod cgroup)
//	<root>/proxy_cgroups                      node-wide: the proxy processes' cgroups (HASH)
//
// Attach is atomic: everything is built and pinned under <root>/tmp and
// renamed into place only when complete; on any error what was done is
// undone. Mutations hold an flock on <root>.
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
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/bpfobj"
	"github.com/ambpf/ambpf/pkg/cgroup"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// DefaultRoot is the bpffs directory holding ambpf's pins.
const DefaultRoot = "/sys/fs/bpf/ambpf"

// DefaultInterface is the pod device the TC programs attach to.
const DefaultInterface = "eth0"

// Errors a caller can test for with errors.Is.
var (
	ErrAttached    = errors.New("pod already attached")
	ErrNotAttached = errors.New("pod not attached")
	ErrBadUID      = errors.New("invalid pod UID")
)

// Pin names inside a pod's directory.
const (
	pinLinkIngress  = "link_tc_ingress"
	pinLinkEgress   = "link_tc_egress"
	pinLinkLoEgress = "link_tc_lo_egress"
	pinLinkSockopt  = "link_cgroup_setsockopt"
	podsDir         = "pods"
	tmpDir          = "tmp"
)

// Config configures a Loader.
type Config struct {
	// Root is the bpffs directory for pins; DefaultRoot when empty. It
	// must be on a mounted bpffs.
	Root string
	// Mode forces an attach mode; zero detects it (tcx on >= 6.6).
	Mode Mode
	// Logger receives progress and decisions; slog.Default() when nil.
	Logger *slog.Logger
}

// Options are the per-pod switches, Istio's pod annotations.
type Options struct {
	// DNSCapture sends the pod's DNS (UDP and TCP port 53) to the proxy's
	// resolver on 15053.
	DNSCapture bool
	// BypassInbound leaves inbound connections uncaptured.
	BypassInbound bool
}

func (o Options) flags() uint32 {
	var f uint32
	if o.DNSCapture {
		f |= cfgDNSCapture
	}
	if o.BypassInbound {
		f |= cfgBypassInbound
	}
	return f
}

func optionsFromFlags(f uint32) Options {
	return Options{DNSCapture: f&cfgDNSCapture != 0, BypassInbound: f&cfgBypassInbound != 0}
}

const (
	cfgDNSCapture    = 1 << 0
	cfgBypassInbound = 1 << 1
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
	root string
	log  *slog.Logger
	feat Features
	spec *ebpf.CollectionSpec
	tag  [8]byte
}

var uidPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`)

// New prepares a Loader: checks that Root is on bpffs, creates its
// directories, and detects kernel features. It attaches nothing.
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
	for _, d := range []string{root, filepath.Join(root, podsDir), filepath.Join(root, tmpDir)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	feat, err := DetectFeatures()
	if err != nil {
		return nil, err
	}
	if cfg.Mode != 0 {
		feat.Mode = cfg.Mode
	}
	spec, err := loadCapture()
	if err != nil {
		return nil, fmt.Errorf("load embedded programs: %w", err)
	}
	l := &Loader{root: root, log: log, feat: feat, spec: spec, tag: ProgramTag()}
	unlock, err := l.lock()
	if err != nil {
		return nil, err
	}
	err = l.ensureProxyCgroups()
	unlock()
	if err != nil {
		return nil, err
	}
	log.Info("datapath ready", "root", root, "features", feat.String())
	return l, nil
}

// ProgramTag identifies the embedded build of the programs: the first bytes
// of the SHA-256 of the object file. Pods attached with another build are
// upgraded by Verify.
func ProgramTag() [8]byte {
	return bpfobj.Tag(_CaptureBytes)
}

// Features reports the mechanisms this Loader uses.
func (l *Loader) Features() Features { return l.feat }

// Root is the bpffs directory holding the pins.
func (l *Loader) Root() string { return l.root }

// PodDir is where a pod's pins live.
func (l *Loader) PodDir(uid string) string { return filepath.Join(l.root, podsDir, uid) }

// lock takes the exclusive cross-process lock on the root directory.
func (l *Loader) lock() (unlock func(), err error) { return bpffs.Lock(l.root) }

// objects are one loaded instance of the programs and maps.
type objects struct {
	captureObjects
}

// load creates the programs, reusing the maps in replace when given (an
// upgrade) or creating fresh ones.
func (l *Loader) load(replace map[string]*ebpf.Map) (*objects, error) {
	var o objects
	// Maps pinned by name in the C source (proxy_cgroups) are node-wide:
	// opened at the root when there, created and pinned there otherwise.
	opts := &ebpf.CollectionOptions{MapReplacements: replace, Maps: ebpf.MapOptions{PinPath: l.root}}
	if err := bpfobj.Load(l.spec, &o.captureObjects, opts, "capture"); err != nil {
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
	}
}

func (o *objects) tcPrograms() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{
		pinLinkIngress:  o.CaptureIngress,
		pinLinkEgress:   o.CaptureEgress,
		pinLinkLoEgress: o.DnsReply,
	}
}

// Attach enrols a pod: loads a fresh instance of the programs, prepares the
// pod's routing and sysctls, attaches the TC programs to the pod's device
// and lo (and the mark guard to its cgroup), records the flows already open
// so they keep flowing, and pins it all. Either all of it is in place when
// Attach returns nil, or none of it is. A pod already attached gives
// ErrAttached.
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
	unlock, err := l.lock()
	if err != nil {
		return Status{}, err
	}
	defer unlock()

	final := l.PodDir(p.UID)
	nsid, err := p.Netns.ID()
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
	}
	if _, err := os.Stat(final); err == nil {
		return l.reattach(p, nsid)
	}
	tmp, err := os.MkdirTemp(filepath.Join(l.root, tmpDir), p.UID+"-")
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: create pin dir: %w", p.UID, err)
	}
	// Undo on failure: removing the pins and closing our handles detaches
	// every link; the netns changes recorded in info are reverted.
	var (
		o      *objects
		links  []link.Link
		info   capturePodInfo
		netSet bool
		qdisc  bool
	)
	defer func() {
		if err == nil {
			return
		}
		var errs []error
		errs = append(errs, os.RemoveAll(tmp))
		for _, lk := range links {
			errs = append(errs, lk.Detach(), lk.Close())
		}
		if netSet || qdisc {
			errs = append(errs, p.Netns.Do(func() error {
				var e []error
				if qdisc {
					e = append(e, clsactDetach(&info))
				}
				if netSet {
					e = append(e, teardownNetns(&info, p.Interface))
				}
				return errors.Join(e...)
			}))
		}
		if o != nil {
			errs = append(errs, o.Close())
		}
		if cerr := errors.Join(errs...); cerr != nil {
			err = fmt.Errorf("%w (cleanup: %v)", err, cerr)
		}
	}()

	o, err = l.load(nil)
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
	}
	for name, m := range o.mapsByName() {
		if err := m.Pin(filepath.Join(tmp, name)); err != nil {
			return Status{}, fmt.Errorf("attach %s: pin %s: %w", p.UID, name, err)
		}
	}
	if err := o.PodConfig.Put(uint32(0), captureConfig{Flags: p.Options.flags()}); err != nil {
		return Status{}, fmt.Errorf("attach %s: write config: %w", p.UID, err)
	}

	bpffs.CopyCString(info.Uid[:], p.UID)
	bpffs.CopyCString(info.Ifname[:], p.Interface)
	info.NetnsDev, info.NetnsIno = nsid.Dev, nsid.Ino
	info.Mode = uint32(l.feat.Mode)
	info.ProgramTag = l.tag
	info.AttachedUnixNs = uint64(time.Now().UnixNano())

	err = p.Netns.Do(func() error {
		ifindex, err := tcattach.InterfaceIndex(p.Interface)
		if err != nil {
			return err
		}
		info.Ifindex = uint32(ifindex)
		if err := setupNetns(&info, p.Interface); err != nil {
			return err
		}
		netSet = true
		// Record what was changed before attaching, so a crash from
		// here on leaves enough in the temporary pins to clean up.
		if err := o.PodMeta.Put(uint32(0), info); err != nil {
			return fmt.Errorf("write pod meta: %w", err)
		}
		switch l.feat.Mode {
		case ModeTCX:
			ls, err := tcattach.AttachTCX(tcHooks(ifindex, o))
			links = append(links, ls...)
			if err != nil {
				return err
			}
		case ModeClsact:
			qdisc = true
			if err := clsactAttach(&info, ifindex, o); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unknown attach mode %v", l.feat.Mode)
		}
		// After attaching, so no flow can slip between the snapshot and
		// the programs: a flow opened meanwhile is in the snapshot.
		return recordPreexisting(o.DirectFlows, l.log)
	})
	if err != nil {
		return Status{}, fmt.Errorf("attach %s in netns: %w", p.UID, err)
	}
	if p.Cgroup != "" {
		cg, err := link.AttachCgroup(link.CgroupOptions{Path: p.Cgroup, Attach: ebpf.AttachCGroupSetsockopt, Program: o.GuardMark})
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
		for i, name := range []string{pinLinkIngress, pinLinkEgress, pinLinkLoEgress} {
			if err := links[i].Pin(filepath.Join(tmp, name)); err != nil {
				return Status{}, fmt.Errorf("attach %s: pin %s: %w", p.UID, name, err)
			}
		}
	} else {
		for name, prog := range o.programsByPin() {
			if err := prog.Pin(filepath.Join(tmp, name)); err != nil {
				return Status{}, fmt.Errorf("attach %s: pin %s: %w", p.UID, name, err)
			}
		}
	}
	if err := o.PodMeta.Put(uint32(0), info); err != nil {
		return Status{}, fmt.Errorf("attach %s: write pod meta: %w", p.UID, err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return Status{}, fmt.Errorf("attach %s: publish pins: %w", p.UID, err)
	}
	// The pins hold everything now; our handles can go.
	for _, lk := range links {
		lk.Close()
	}
	o.Close()
	l.log.Info("pod attached", "uid", p.UID, "interface", p.Interface, "mode", l.feat.Mode.String(),
		"dns_capture", p.DNSCapture, "bypass_inbound", p.BypassInbound, "cgroup", p.Cgroup,
		"took", time.Since(start))
	return l.status(p.UID)
}

// reattach brings an attached pod up to date; the caller holds the lock.
func (l *Loader) reattach(p Pod, nsid netns.ID) (Status, error) {
	dir := l.PodDir(p.UID)
	info, err := readMeta(dir)
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
	}
	if info.NetnsDev != nsid.Dev || info.NetnsIno != nsid.Ino {
		return Status{}, fmt.Errorf("attach %s: %w in another network namespace", p.UID, ErrAttached)
	}
	if err := l.SetOptions(p.UID, p.Options); err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
	}
	if info.ProgramTag != l.tag {
		if err := l.upgrade(p.UID); err != nil {
			return Status{}, fmt.Errorf("attach %s: %w", p.UID, err)
		}
	}
	l.log.Info("pod already attached, brought up to date", "uid", p.UID)
	return l.status(p.UID)
}

func (o *objects) programsByPin() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{
		"prog_" + captureProgCaptureIngress: o.CaptureIngress,
		"prog_" + captureProgCaptureEgress:  o.CaptureEgress,
		"prog_" + captureProgDnsReply:       o.DnsReply,
	}
}

// SetOptions changes a pod's options in place; new packets see them at once.
func (l *Loader) SetOptions(uid string, opts Options) error {
	m, err := ebpf.LoadPinnedMap(filepath.Join(l.PodDir(uid), captureMapPodConfig), nil)
	if err != nil {
		return fmt.Errorf("set options %s: %w", uid, notAttached(err))
	}
	defer m.Close()
	if err := m.Put(uint32(0), captureConfig{Flags: opts.flags()}); err != nil {
		return fmt.Errorf("set options %s: %w", uid, err)
	}
	return nil
}

func notAttached(err error) error { return bpffs.MissingAs(err, ErrNotAttached) }

// Detach removes a pod's datapath: links and filters, pins, and the rules,
// routes and sysctls Attach set (when the pod's netns still exists; it is
// found by its identity in pod_meta). Detaching a pod that is not attached
// gives ErrNotAttached.
func (l *Loader) Detach(uid string) error {
	if !uidPattern.MatchString(uid) {
		return fmt.Errorf("%w: %q", ErrBadUID, uid)
	}
	unlock, err := l.lock()
	if err != nil {
		return err
	}
	defer unlock()
	dir := l.PodDir(uid)
	if _, err := os.Stat(dir); err != nil {
		return fmt.Errorf("detach %s: %w", uid, notAttached(err))
	}
	if err := l.detachDir(dir); err != nil {
		return fmt.Errorf("detach %s: %w", uid, err)
	}
	l.log.Info("pod detached", "uid", uid)
	return nil
}

// detachDir undoes one pod directory, final or temporary.
func (l *Loader) detachDir(dir string) error {
	var errs []error
	info, ierr := readMeta(dir)
	if ierr == nil && (info.Setup != 0 || hasSysctls(&info) || Mode(info.Mode) == ModeClsact) {
		ns, err := findNetns(netns.ID{Dev: info.NetnsDev, Ino: info.NetnsIno})
		switch {
		case err == nil:
			errs = append(errs, ns.Do(func() error {
				var e []error
				if Mode(info.Mode) == ModeClsact {
					e = append(e, clsactDetach(&info))
				}
				e = append(e, teardownNetns(&info, bpffs.CString(info.Ifname[:])))
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
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "link_") {
			errs = append(errs, tcattach.DetachPinned(filepath.Join(dir, e.Name())))
		}
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

func readMeta(dir string) (capturePodInfo, error) {
	var info capturePodInfo
	err := bpffs.ReadSingle(dir, captureMapPodMeta, &info)
	return info, err
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

// Upgrade swaps a pod's programs for this build's, keeping its maps (and so
// its state and counters): tcx links are updated in place, clsact filters
// replaced, so no packet is processed by neither version.
func (l *Loader) Upgrade(uid string) error {
	unlock, err := l.lock()
	if err != nil {
		return err
	}
	defer unlock()
	return l.upgrade(uid)
}

func (l *Loader) upgrade(uid string) (err error) {
	dir := l.PodDir(uid)
	info, err := readMeta(dir)
	if err != nil {
		return fmt.Errorf("upgrade %s: %w", uid, notAttached(err))
	}
	replace := map[string]*ebpf.Map{}
	defer func() {
		for _, m := range replace {
			m.Close()
		}
	}()
	// Maps this build added, or whose layout it changed: created anew
	// (carrying the old content over) and pinned once the programs run.
	var repin []string
	for name, ms := range l.spec.Maps {
		if name == ".rodata" || name == ".data" || name == ".bss" || name == "__license" || ms.Pinning == ebpf.PinByName {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			repin = append(repin, name)
			continue
		}
		if err != nil {
			return fmt.Errorf("upgrade %s: open map %s: %w", uid, name, err)
		}
		if ms.Compatible(m) != nil {
			nm, err := migrateMap(ms, m)
			m.Close()
			if err != nil {
				return fmt.Errorf("upgrade %s: migrate map %s: %w", uid, name, err)
			}
			m = nm
			repin = append(repin, name)
		}
		replace[name] = m
	}
	o, err := l.load(replace)
	if err != nil {
		return fmt.Errorf("upgrade %s: %w", uid, err)
	}
	defer o.Close()
	switch Mode(info.Mode) {
	case ModeTCX:
		for name, prog := range o.tcPrograms() {
			if err := updatePinnedLink(filepath.Join(dir, name), prog); err != nil {
				return fmt.Errorf("upgrade %s: %w", uid, err)
			}
		}
	case ModeClsact:
		ns, err := findNetns(netns.ID{Dev: info.NetnsDev, Ino: info.NetnsIno})
		if err != nil {
			return fmt.Errorf("upgrade %s: %w", uid, err)
		}
		err = ns.Do(func() error { return clsactAttach(&info, int(info.Ifindex), o) })
		ns.Close()
		if err != nil {
			return fmt.Errorf("upgrade %s: %w", uid, err)
		}
		for name, prog := range o.programsByPin() {
			path := filepath.Join(dir, name)
			os.Remove(path)
			if err := prog.Pin(path); err != nil {
				return fmt.Errorf("upgrade %s: pin %s: %w", uid, name, err)
			}
		}
	}
	if _, err := os.Stat(filepath.Join(dir, pinLinkSockopt)); err == nil {
		if err := updatePinnedLink(filepath.Join(dir, pinLinkSockopt), o.GuardMark); err != nil {
			return fmt.Errorf("upgrade %s: %w", uid, err)
		}
	}
	for _, name := range repin {
		// Pinned beside the old one and renamed over it: the pin is
		// never missing.
		path := filepath.Join(dir, name)
		if err := o.mapsByName()[name].Pin(path + "_new"); err != nil {
			return fmt.Errorf("upgrade %s: pin %s: %w", uid, name, err)
		}
		if err := os.Rename(path+"_new", path); err != nil {
			os.Remove(path + "_new")
			return fmt.Errorf("upgrade %s: pin %s: %w", uid, name, err)
		}
	}
	info.ProgramTag = l.tag
	if err := o.PodMeta.Put(uint32(0), info); err != nil {
		return fmt.Errorf("upgrade %s: write meta: %w", uid, err)
	}
	l.log.Info("pod upgraded", "uid", uid, "program_tag", hex.EncodeToString(l.tag[:]))
	return nil
}

// migrateMap creates the map of spec and carries old's entries over, for
// an upgrade from a build whose layout differs. Values keep their leading
// bytes (struct fields are only ever appended, as in struct counters);
// direct_flows entries of builds before expiry (value 1) become attach-time
// flows with a fresh expiry. Entries that no longer fit are left out.
func migrateMap(spec *ebpf.MapSpec, old *ebpf.Map) (*ebpf.Map, error) {
	nm, err := ebpf.NewMap(spec.Copy())
	if err != nil {
		return nil, err
	}
	if old.KeySize() != spec.KeySize {
		return nm, nil // nothing to carry over
	}
	k, v := make([]byte, old.KeySize()), make([]byte, old.ValueSize())
	it := old.Iterate()
	for it.Next(k, v) {
		nv := make([]byte, spec.ValueSize)
		copy(nv, v)
		var value any = nv
		if spec.Name == captureMapDirectFlows && old.ValueSize() == 8 {
			value = captureDirectFlow{ExpiresNs: monotonicNow() + uint64(directIdle), Origin: directAttached}
		}
		if err := nm.Update(k, value, ebpf.UpdateAny); err != nil && !errors.Is(err, unix.E2BIG) {
			nm.Close()
			return nil, fmt.Errorf("copy entry: %w", err)
		}
	}
	if err := it.Err(); err != nil {
		nm.Close()
		return nil, fmt.Errorf("read old entries: %w", err)
	}
	return nm, nil
}

func updatePinnedLink(path string, prog *ebpf.Program) error {
	lk, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		return fmt.Errorf("open link %s: %w", filepath.Base(path), err)
	}
	defer lk.Close()
	if err := lk.Update(prog); err != nil {
		return fmt.Errorf("update link %s: %w", filepath.Base(path), err)
	}
	return nil
}

// VerifyResult is what Verify found and did for one pod.
type VerifyResult struct {
	UID    string
	Action string // "ok", "upgraded", "removed", "broken"
	Reason string
}

// Verify checks every pinned pod, for use when a process starts: a pod
// whose network namespace is gone is removed, one attached with another
// build is upgraded, one missing an attachment is reported broken (the
// caller re-enrols it). Leftovers of an attach that never finished are
// removed, and expired direct flows of the pods kept (ExpireFlows).
func (l *Loader) Verify() ([]VerifyResult, error) {
	unlock, err := l.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	tmps, err := os.ReadDir(filepath.Join(l.root, tmpDir))
	if err != nil {
		return nil, fmt.Errorf("verify: %w", err)
	}
	var errs []error
	for _, t := range tmps {
		l.log.Warn("removing an unfinished attach", "dir", t.Name())
		errs = append(errs, l.detachDir(filepath.Join(l.root, tmpDir, t.Name())))
	}
	entries, err := os.ReadDir(filepath.Join(l.root, podsDir))
	if err != nil {
		return nil, fmt.Errorf("verify: %w", err)
	}
	var out []VerifyResult
	for _, e := range entries {
		uid := e.Name()
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
			res.Action, res.Reason = "broken", "a program is not attached: "+st.missing()
		case !st.Current:
			res.Action, res.Reason = "upgraded", "program build "+st.ProgramTag+" replaced"
			if err := l.upgrade(uid); err != nil {
				res.Action, res.Reason = "broken", err.Error()
			}
		}
		if res.Action == "ok" || res.Action == "upgraded" {
			// Flows that ended while no process swept them.
			if n, err := l.ExpireFlows(uid); err != nil {
				l.log.Warn("expire direct flows", "uid", uid, "err", err)
			} else if n > 0 {
				l.log.Info("expired direct flows", "uid", uid, "flows", n)
			}
		}
		l.log.Info("verified pod", "uid", uid, "action", res.Action, "reason", res.Reason)
		out = append(out, res)
	}
	return out, errors.Join(errs...)
}
