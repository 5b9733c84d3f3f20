//go:build linux

// Package probesnat loads, attaches, pins and removes bpf/hostprobe.c: the
// eBPF replacement for the host iptables rule with which Istio ambient SNATs
// the node's own connections to an enrolled pod (kubelet probes) to
// 169.254.7.127 / fd16:9254:7127:1337:ffff:ffff:ffff:ffff. The in-pod
// datapath lets connections from those addresses through uncaptured; this
// package makes the node's connections carry them, while connections the
// node only forwards from other pods keep their source and stay captured.
//
// The programs sit on every enrolled pod's veth peer in the node's network
// namespace (with a bridge, the bridge port): egress translates the node's
// packets to the pod, ingress restores the node's address on the pod's
// replies. One instance of the programs and maps serves the whole node:
// they are loaded once per build and pinned under <root>/hostprobe_node/;
// each device gets only its two attachments (the same two programs on
// every device) pinned under <root>/hostprobe/<ifname>/, and its entries,
// keyed by its ifindex, in the node's probe_meta and probe_stats. The pins
// are the state, so the translation keeps working while no process holds
// it. Pin layout:
//
//	<root>/hostprobe_node/probe_nat        translated connections, whole node (LRU_HASH, Config.NATEntries)
//	<root>/hostprobe_node/probe_stats      counters by ifindex (HASH, no prealloc, Config.MaxInterfaces)
//	<root>/hostprobe_node/probe_meta       what was attached, by ifindex (HASH, no prealloc)
//	<root>/hostprobe_node/probe_node       the build running and the sizes (ARRAY, 1 entry)
//	<root>/hostprobe_node/prog_probe_snat  the programs, shared by every device
//	<root>/hostprobe_node/prog_probe_unsnat
//	<root>/hostprobe/<ifname>/link_tc_egress  tcx link, SNAT        (tcx mode; empty dir in clsact mode,
//	<root>/hostprobe/<ifname>/link_tc_ingress tcx link, reverse      where the filters hold the programs)
//
// A new build swaps the programs on every device (tcx link update, clsact
// filter replace), keeping the maps, or migrating those whose layout or
// size changed. Devices a per-pod build attached (each with its own
// programs and maps in <root>/hostprobe/<ifname>/) are moved onto the
// node's programs in place by Verify and Prune (see legacy.go).
//
// Attach is atomic (links pinned under <root>/hostprobe_tmp and renamed
// into place when complete; undone on any error), and mutations hold an
// flock on <root>/hostprobe.
package probesnat

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/bpfobj"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/pinset"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// Errors a caller can test for with errors.Is.
var (
	ErrAttached    = errors.New("interface already attached")
	ErrNotAttached = errors.New("interface not attached")
	ErrBadName     = errors.New("invalid interface name")
)

const (
	subDir          = "hostprobe"
	tmpSubDir       = "hostprobe_tmp"
	nodeSubDir      = "hostprobe_node"
	maxIfnameLength = unix.IFNAMSIZ - 1
)

// Config configures a Loader.
type Config struct {
	// Root is the bpffs directory for pins (shared with pkg/datapath);
	// datapath.DefaultRoot when empty. It must be on a mounted bpffs.
	Root string
	// Netns is the node's network namespace, where the pods' veth peers
	// live; the caller keeps ownership. Nil means the namespace of the
	// thread calling New (an agent on the host network).
	Netns *netns.NS
	// Mode forces an attach mode; zero takes the datapath's default
	// (clsact, datapath.DetectFeatures).
	Mode tcattach.Mode
	// Logger receives progress and decisions; slog.Default() when nil.
	Logger *slog.Logger
	// NATEntries is the capacity of the node-wide probe_nat (an LRU, so
	// preallocated: about 100 bytes an entry); DefaultNATEntries when 0.
	NATEntries uint32
	// MaxInterfaces bounds how many devices can be attached at once (the
	// size of probe_stats and probe_meta, not preallocated);
	// DefaultMaxInterfaces when 0. Changing either size on a node migrates
	// the maps at the next Attach, Verify or Prune.
	MaxInterfaces uint32
}

// Loader attaches and manages the translation on the veth peers of one
// node namespace. Its methods are safe for concurrent use and across
// processes (they serialise on an flock).
type Loader struct {
	root  string
	ns    *netns.NS
	ownNS bool
	nsid  netns.ID
	mode  tcattach.Mode
	log   *slog.Logger
	spec  *ebpf.CollectionSpec
	tag   [8]byte

	natEntries, maxIfaces uint32
}

// Device names become pin directory names: at most 15 bytes (IFNAMSIZ),
// and no '.', which bpffs refuses in names (so VLAN-style "eth0.100"
// devices cannot be attached).
var ifnamePattern = regexp.MustCompile(`^[A-Za-z0-9_@:-]{1,15}$`)

func checkName(ifname string) error {
	if !ifnamePattern.MatchString(ifname) || len(ifname) > maxIfnameLength {
		return fmt.Errorf("%w: %q", ErrBadName, ifname)
	}
	return nil
}

// New prepares a Loader: checks that Root is on bpffs, creates its
// directories and detects the attach mode. It attaches and loads nothing
// (the node's programs are loaded by the first Attach). Close
// releases what New opened.
func New(cfg Config) (*Loader, error) {
	l := &Loader{root: cfg.Root, ns: cfg.Netns, mode: cfg.Mode, log: cfg.Logger}
	l.natEntries, l.maxIfaces = cfg.sizes()
	if l.root == "" {
		l.root = datapath.DefaultRoot
	}
	if l.log == nil {
		l.log = slog.Default()
	}
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("remove memlock limit: %w", err)
	}
	if err := bpffs.Check(l.root); err != nil {
		return nil, err
	}
	for _, d := range []string{l.root, filepath.Join(l.root, subDir), filepath.Join(l.root, tmpSubDir)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	if l.mode == 0 {
		// The datapath's choice (clsact: no RCU grace period per link,
		// datapath.DetectFeatures), so a pod's hooks are all made alike.
		feat, err := datapath.DetectFeatures()
		if err != nil {
			return nil, err
		}
		l.mode = feat.Mode
	}
	spec, err := loadHostprobe()
	if err != nil {
		return nil, fmt.Errorf("load embedded programs: %w", err)
	}
	spec.Maps[hostprobeMapProbeNat].MaxEntries = l.natEntries
	spec.Maps[hostprobeMapProbeStats].MaxEntries = l.maxIfaces
	spec.Maps[hostprobeMapProbeMeta].MaxEntries = l.maxIfaces
	l.spec, l.tag = spec, ProgramTag()
	if l.ns == nil {
		if l.ns, err = netns.Current(); err != nil {
			return nil, err
		}
		l.ownNS = true
	}
	if l.nsid, err = l.ns.ID(); err != nil {
		l.Close()
		return nil, err
	}
	l.log.Info("probe snat ready", "root", l.root, "mode", l.mode.String())
	return l, nil
}

// Close releases the Loader's handles. It detaches nothing: attached
// devices stay translated through their pins.
func (l *Loader) Close() error {
	if l.ownNS {
		return l.ns.Close()
	}
	return nil
}

// ProgramTag identifies the embedded build of the programs: the first
// bytes of the SHA-256 of the object file.
func ProgramTag() [8]byte {
	return bpfobj.Tag(_HostprobeBytes)
}

// Mode is the attach mode in use.
func (l *Loader) Mode() tcattach.Mode { return l.mode }

// Dir is where the pins of a device live.
func (l *Loader) Dir(ifname string) string { return filepath.Join(l.root, subDir, ifname) }

// lock takes the exclusive cross-process lock on <root>/hostprobe.
func (l *Loader) lock() (unlock func(), err error) {
	return bpffs.Lock(filepath.Join(l.root, subDir))
}

// Attach starts translating the node's connections to the pod behind
// ifname, a veth peer in the node namespace: it loads the node's programs
// when this build does not run yet, records the device in the node's maps
// and attaches the shared programs to the device's egress and ingress.
// Either all of it is in place when Attach returns nil, or none of the
// device's part is. Attaching an attached device again is a no-op; when
// the device was re-created under the same name, the stale attachment is
// replaced.
func (l *Loader) Attach(ifname string) (st Status, err error) {
	if err := checkName(ifname); err != nil {
		return Status{}, err
	}
	start := time.Now()
	unlock, err := l.lock()
	if err != nil {
		return Status{}, err
	}
	defer unlock()

	var ifindex int
	if err := l.ns.Do(func() (err error) { ifindex, err = tcattach.InterfaceIndex(ifname); return err }); err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", ifname, err)
	}
	final := l.Dir(ifname)
	if err := l.ensureNode(); err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", ifname, err)
	}
	if isLegacy(final) {
		if err := l.migrateLegacy(ifname); err != nil {
			return Status{}, fmt.Errorf("attach %s: %w", ifname, err)
		}
	}
	n, err := l.openNode()
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", ifname, err)
	}
	defer n.Close()
	prev, found, err := n.find(ifname)
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", ifname, err)
	}
	if found {
		_, derr := os.Stat(final)
		switch {
		case prev.info.NetnsDev != l.nsid.Dev || prev.info.NetnsIno != l.nsid.Ino:
			return Status{}, fmt.Errorf("attach %s: %w in another network namespace", ifname, ErrAttached)
		case int(prev.ifindex) == ifindex && derr == nil:
			return l.status(ifname)
		}
		l.log.Info("device re-created: replacing its stale translation", "interface", ifname,
			"old_ifindex", prev.ifindex, "ifindex", ifindex)
		if err := l.detachIface(n, final, prev); err != nil {
			return Status{}, fmt.Errorf("attach %s: remove stale attachment: %w", ifname, err)
		}
	} else if _, serr := os.Stat(final); serr == nil {
		// A directory without an entry: a detach that stopped half-way.
		if err := l.detachLinks(final); err != nil {
			return Status{}, fmt.Errorf("attach %s: remove stale pins: %w", ifname, err)
		}
	}
	// The ifindex recorded for another name: that device is gone (and
	// the kernel gave its index to this one).
	var other hostprobeProbeInfo
	if err := n.meta.Lookup(uint32(ifindex), &other); err == nil {
		name := bpffs.CString(other.Ifname[:])
		if err := l.detachIface(n, l.Dir(name), attached{uint32(ifindex), other}); err != nil {
			return Status{}, fmt.Errorf("attach %s: remove the attachment of gone %s: %w", ifname, name, err)
		}
	}
	progs, err := l.openPrograms()
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", ifname, err)
	}
	defer progs.Close()

	var links []link.Link
	// Our handles go either way, after the undo below: once published,
	// the pins hold the links.
	defer func() {
		for _, lk := range links {
			lk.Close()
		}
	}()
	stage, err := pinset.NewStage(filepath.Join(l.root, tmpSubDir), ifname+"-")
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", ifname, err)
	}
	// Undo on failure, last step first: links detached explicitly,
	// filters deleted, the entries and pins removed.
	defer func() { err = stage.Abort(err) }()
	var info hostprobeProbeInfo

	bpffs.CopyCString(info.Ifname[:], ifname)
	info.NetnsDev, info.NetnsIno = l.nsid.Dev, l.nsid.Ino
	info.Ifindex = uint32(ifindex)
	info.Mode = hostprobeTcMode(l.mode)
	info.ProgramTag = l.tag
	info.AttachedUnixNs = uint64(time.Now().UnixNano())

	// The counters first (the programs count nothing on a device without
	// an entry), then the meta: recorded before attaching, so a crash from
	// here on leaves enough for Prune to undo it.
	stage.OnUndo(func() error { return n.forget(uint32(ifindex)) })
	if err := n.stats.Put(uint32(ifindex), hostprobeProbeCounters{}); err != nil {
		return Status{}, fmt.Errorf("attach %s: write counters (at most %d devices): %w", ifname, l.maxIfaces, err)
	}
	if err := n.meta.Put(uint32(ifindex), info); err != nil {
		return Status{}, fmt.Errorf("attach %s: write meta: %w", ifname, err)
	}
	err = l.ns.Do(func() error {
		switch l.mode {
		case tcattach.ModeTCX:
			var err error
			links, err = hooks.Attach(tcattach.On(nil), l.mode, ifindex, progs.get)
			stage.OnUndo(func() error {
				var errs []error
				for _, lk := range links {
					errs = append(errs, lk.Detach())
				}
				return errors.Join(errs...)
			})
			return err
		case tcattach.ModeClsact:
			stage.OnUndo(func() error { return l.ns.Do(func() error { return clsactDetach(&info) }) })
			return clsactAttach(&info, ifindex, progs)
		}
		return fmt.Errorf("unknown attach mode %v", l.mode)
	})
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", ifname, err)
	}
	if l.mode == tcattach.ModeTCX {
		if err := hooks.PinLinks(stage.Dir(), links); err != nil {
			return Status{}, fmt.Errorf("attach %s: %w", ifname, err)
		}
	}
	if err := n.meta.Put(uint32(ifindex), info); err != nil { // clsactAttach may have set Setup
		return Status{}, fmt.Errorf("attach %s: write meta: %w", ifname, err)
	}
	if err := stage.Publish(final); err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", ifname, err)
	}
	l.log.Info("probe snat attached", "interface", ifname, "ifindex", ifindex, "mode", l.mode.String(),
		"took", time.Since(start))
	return l.status(ifname)
}

// Detach stops the translation on ifname: it detaches the programs
// (explicitly, so no packet is translated once Detach returns), deletes
// the clsact filters (and the qdisc, if Attach created it and nobody
// else's filters remain), deletes the device's entries in the node maps
// and removes its pins. Connections translated so far lose their
// translation. The node's programs stay for the other devices. A device
// that is gone is fine; one that was never attached gives ErrNotAttached.
func (l *Loader) Detach(ifname string) error {
	if err := checkName(ifname); err != nil {
		return err
	}
	unlock, err := l.lock()
	if err != nil {
		return err
	}
	defer unlock()
	dir := l.Dir(ifname)
	if _, err := os.Stat(dir); err != nil {
		return fmt.Errorf("detach %s: %w", ifname, notAttached(err))
	}
	if isLegacy(dir) {
		err = l.detachLegacy(dir)
	} else {
		err = l.detachByName(ifname)
	}
	if err != nil {
		return fmt.Errorf("detach %s: %w", ifname, err)
	}
	l.log.Info("probe snat detached", "interface", ifname)
	return nil
}

func notAttached(err error) error { return bpffs.MissingAs(err, ErrNotAttached) }

// detachByName undoes the attachment recorded for ifname in the node
// maps, and its directory; the caller holds the lock.
func (l *Loader) detachByName(ifname string) error {
	n, err := l.openNode()
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return l.detachLinks(l.Dir(ifname)) // no node: nothing recorded
		}
		return err
	}
	defer n.Close()
	a, found, err := n.find(ifname)
	if err != nil {
		return err
	}
	if !found {
		return l.detachLinks(l.Dir(ifname))
	}
	return l.detachIface(n, l.Dir(ifname), a)
}

// detachIface undoes one device: its hooks, its entries in the node maps
// and its directory dir; the caller holds the lock.
func (l *Loader) detachIface(n *nodeMaps, dir string, a attached) error {
	if a.info.NetnsDev != l.nsid.Dev || a.info.NetnsIno != l.nsid.Ino {
		return fmt.Errorf("%s belongs to another network namespace (dev=%d ino=%d)", dir, a.info.NetnsDev, a.info.NetnsIno)
	}
	var errs []error
	if a.info.Mode == modeClsact {
		errs = append(errs, l.ns.Do(func() error { return clsactDetach(&a.info) }))
	}
	errs = append(errs, l.detachLinks(dir), n.forget(a.ifindex))
	return errors.Join(errs...)
}

// detachLinks detaches the tcx links pinned in dir (explicitly, so no
// packet is translated once it returns: pinset.Table.Detach) and removes
// dir.
func (l *Loader) detachLinks(dir string) error {
	return errors.Join(hooks.Detach(dir), os.RemoveAll(dir))
}

// Verify brings the node to this build: loads or swaps in its programs
// (migrating maps whose layout or size changed) when the node has any
// device attached, and moves the devices a per-pod build attached onto
// them. It returns the names of the devices migrated.
func (l *Loader) Verify() ([]string, error) {
	unlock, err := l.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	return l.verify()
}

// verify is Verify with the lock held.
func (l *Loader) verify() ([]string, error) {
	names, err := l.names()
	if err != nil {
		return nil, err
	}
	_, nerr := os.Stat(l.NodeDir())
	if len(names) == 0 && nerr != nil {
		return nil, nil // nothing was ever attached here
	}
	if err := l.ensureNode(); err != nil {
		return nil, err
	}
	var migrated []string
	var errs []error
	for _, name := range names {
		if !isLegacy(l.Dir(name)) {
			continue
		}
		if err := l.migrateLegacy(name); err != nil {
			errs = append(errs, err)
			continue
		}
		migrated = append(migrated, name)
	}
	return migrated, errors.Join(errs...)
}

// Prune removes leftovers, for use when a process starts: attaches that
// never finished, and devices that are gone (a pod's veth goes with its
// netns, detaching its tcx links; the pins and entries would stay). It
// first brings the node to this build (Verify). It returns the names of
// the devices removed.
func (l *Loader) Prune() ([]string, error) {
	unlock, err := l.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	var errs []error
	if _, err := l.verify(); err != nil {
		errs = append(errs, fmt.Errorf("prune: %w", err))
	}
	tmps, err := os.ReadDir(filepath.Join(l.root, tmpSubDir))
	if err != nil {
		return nil, fmt.Errorf("prune: %w", err)
	}
	for _, t := range tmps {
		l.log.Warn("removing an unfinished probe snat attach", "dir", t.Name())
		errs = append(errs, l.detachLinks(filepath.Join(l.root, tmpSubDir, t.Name())))
	}
	// Entries without a directory: attaches that stopped before
	// publishing (their directory, removed above, was temporary).
	if n, err := l.openNode(); err == nil {
		all, err := n.entries()
		errs = append(errs, err)
		for _, a := range all {
			name := bpffs.CString(a.info.Ifname[:])
			if _, err := os.Stat(l.Dir(name)); err == nil || a.info.NetnsDev != l.nsid.Dev || a.info.NetnsIno != l.nsid.Ino {
				continue
			}
			l.log.Warn("removing the entries of an unfinished probe snat attach", "interface", name, "ifindex", a.ifindex)
			errs = append(errs, l.detachIface(n, l.Dir(name), a))
		}
		n.Close()
	} else if !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, err)
	}
	names, err := l.names()
	if err != nil {
		return nil, err
	}
	var removed []string
	for _, name := range names {
		st, err := l.status(name)
		if err != nil && !errors.Is(err, ErrNotAttached) {
			errs = append(errs, err)
			continue
		}
		if err == nil && st.DevicePresent {
			continue
		}
		if err := l.detachByName(name); err != nil {
			errs = append(errs, fmt.Errorf("prune %s: %w", name, err))
			continue
		}
		l.log.Info("removed probe snat of a device that is gone", "interface", name)
		removed = append(removed, name)
	}
	return removed, errors.Join(errs...)
}

func (l *Loader) names() ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(l.root, subDir))
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", subDir, err)
	}
	var out []string
	for _, e := range entries {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out, nil
}

// Counters are a device's translation counters (bpf/hostprobe.c explains each).
type Counters struct {
	Translated uint64 `json:"translated"`
	Replaced   uint64 `json:"replaced"`
	Refused    uint64 `json:"refused"`
	NotLocal   uint64 `json:"not_local"`
	NotOwned   uint64 `json:"not_owned"`
	Restored   uint64 `json:"restored"`
}

// Status is one device's translation as read from its pins.
type Status struct {
	Interface  string    `json:"interface"`
	Ifindex    uint32    `json:"ifindex"`
	Netns      netns.ID  `json:"netns"`
	Mode       string    `json:"mode"`
	AttachedAt time.Time `json:"attached_at"`
	ProgramTag string    `json:"program_tag"`
	PinDir     string    `json:"pin_dir"`
	// DevicePresent is true when a device with the recorded name and
	// ifindex still exists in the node namespace.
	DevicePresent bool `json:"device_present"`
	// Attached is true when both programs are attached to the device.
	Attached bool     `json:"attached"`
	Counters Counters `json:"counters"`
}

// Get returns one device's status, or ErrNotAttached.
func (l *Loader) Get(ifname string) (Status, error) {
	if err := checkName(ifname); err != nil {
		return Status{}, err
	}
	return l.status(ifname)
}

// List returns the status of every attached device, sorted by name.
// It takes no lock: a device detached while it runs is left out.
func (l *Loader) List() ([]Status, error) {
	names, err := l.names()
	if err != nil {
		return nil, err
	}
	out := make([]Status, 0, len(names))
	for _, name := range names {
		st, err := l.status(name)
		if errors.Is(err, ErrNotAttached) {
			continue // detached meanwhile, or a detach that stopped half-way (Prune removes it)
		}
		if err != nil {
			return nil, err
		}
		out = append(out, st)
	}
	return out, nil
}

func (l *Loader) status(ifname string) (Status, error) {
	dir := l.Dir(ifname)
	if _, err := os.Stat(dir); err != nil {
		return Status{}, fmt.Errorf("status %s: %w", ifname, notAttached(err))
	}
	if isLegacy(dir) {
		return l.legacyStatus(ifname)
	}
	n, err := l.openNode()
	if err != nil {
		return Status{}, fmt.Errorf("status %s: %w", ifname, notAttached(err))
	}
	defer n.Close()
	a, found, err := n.find(ifname)
	if err != nil {
		return Status{}, fmt.Errorf("status %s: %w", ifname, err)
	}
	if !found {
		return Status{}, fmt.Errorf("status %s: %w (a directory without an entry)", ifname, ErrNotAttached)
	}
	var c hostprobeProbeCounters
	if err := n.stats.Lookup(a.ifindex, &c); err != nil {
		return Status{}, fmt.Errorf("status %s: read counters: %w", ifname, err)
	}
	return l.statusOf(dir, a.info, c)
}

// statusOf completes a device's status from what was recorded: whether
// the device is still there and its hooks attached.
func (l *Loader) statusOf(dir string, info hostprobeProbeInfo, c hostprobeProbeCounters) (Status, error) {
	ifname := bpffs.CString(info.Ifname[:])
	st := Status{
		Interface:  ifname,
		Ifindex:    info.Ifindex,
		Netns:      netns.ID{Dev: info.NetnsDev, Ino: info.NetnsIno},
		Mode:       tcattach.Mode(info.Mode).String(),
		AttachedAt: time.Unix(0, int64(info.AttachedUnixNs)),
		ProgramTag: hex.EncodeToString(info.ProgramTag[:]),
		PinDir:     dir,
	}
	st.Counters = Counters{Translated: c.Translated, Replaced: c.Replaced, Refused: c.Refused,
		NotLocal: c.NotLocal, NotOwned: c.NotOwned, Restored: c.Restored}
	if st.Netns != l.nsid {
		return st, nil // another namespace's pins: nothing here to look at
	}
	var hooked int
	err := l.ns.Do(func() error {
		idx, err := tcattach.InterfaceIndex(st.Interface)
		st.DevicePresent = err == nil && uint32(idx) == info.Ifindex
		if !st.DevicePresent {
			return nil
		}
		switch info.Mode {
		case modeTCX:
			for _, pin := range hooks.LinkPins(dir) {
				if tcattach.PinnedLinkState(pin).Attached {
					hooked++
				}
			}
		case modeClsact:
			n, _, err := hooks.Present(tcattach.On(nil), int(info.Ifindex))
			hooked = n
			return err
		}
		return nil
	})
	if err != nil {
		return Status{}, fmt.Errorf("status %s: %w", ifname, err)
	}
	st.Attached = hooked == len(hooks.Hooks)
	return st, nil
}
