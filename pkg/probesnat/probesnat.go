//go:build linux

// Package probesnat loads, attaches, pins and removes bpf/hostprobe.c: the
// eBPF replacement for the host iptables rule with which Istio ambient SNATs
// the node's own connections to an enrolled pod (kubelet probes) to
// 169.254.7.127 / fd16:9254:7127:1337:ffff:ffff:ffff:ffff. The in-pod
// datapath lets connections from those addresses through uncaptured; this
// package makes the node's connections carry them, while connections the
// node only forwards from other pods keep their source and stay captured.
//
// The programs sit on a pod's veth peer in the node's network namespace
// (with a bridge, the bridge port): egress translates the node's packets to
// the pod, ingress restores the node's address on the pod's replies. Each
// device gets its own instance of the programs and maps, pinned under
// <root>/hostprobe/<ifname>/ in bpffs; the pins are the state, so the
// translation keeps working while no process holds it. Pin layout:
//
//	<root>/hostprobe/<ifname>/probe_nat       translated connections (LRU_HASH)
//	<root>/hostprobe/<ifname>/probe_stats     counters (ARRAY, 1 entry)
//	<root>/hostprobe/<ifname>/probe_meta      what was attached (ARRAY, 1 entry)
//	<root>/hostprobe/<ifname>/link_tc_egress  tcx link, SNAT        (tcx mode)
//	<root>/hostprobe/<ifname>/link_tc_ingress tcx link, reverse     (tcx mode)
//	<root>/hostprobe/<ifname>/prog_*          the programs          (clsact mode)
//
// Attach is atomic (built under <root>/hostprobe_tmp and renamed into place
// when complete; undone on any error), and mutations hold an flock on
// <root>/hostprobe.
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
	pinLinkEgress   = "link_tc_egress"
	pinLinkIngress  = "link_tc_ingress"
	setupQdisc      = 1 << 0 // PROBE_SETUP_QDISC
	modeTCX         = uint32(tcattach.ModeTCX)
	modeClsact      = uint32(tcattach.ModeClsact)
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
	// Mode forces an attach mode; zero detects it (tcx on >= 6.6).
	Mode tcattach.Mode
	// Logger receives progress and decisions; slog.Default() when nil.
	Logger *slog.Logger
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
// directories and detects the attach mode. It attaches nothing. Close
// releases what New opened.
func New(cfg Config) (*Loader, error) {
	l := &Loader{root: cfg.Root, ns: cfg.Netns, mode: cfg.Mode, log: cfg.Logger}
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
		k, err := tcattach.DetectKernel()
		if err != nil {
			return nil, err
		}
		l.mode = k.Mode()
	}
	spec, err := loadHostprobe()
	if err != nil {
		return nil, fmt.Errorf("load embedded programs: %w", err)
	}
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

func (l *Loader) load() (*hostprobeObjects, error) {
	var o hostprobeObjects
	if err := bpfobj.Load(l.spec, &o, nil, "probe snat"); err != nil {
		return nil, err
	}
	return &o, nil
}

func (o *hostprobeObjects) mapsByPin() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{
		hostprobeMapProbeNat:   o.ProbeNat,
		hostprobeMapProbeStats: o.ProbeStats,
		hostprobeMapProbeMeta:  o.ProbeMeta,
	}
}

func (o *hostprobeObjects) programsByPin() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{
		"prog_" + hostprobeProgProbeSnat:   o.ProbeSnat,
		"prog_" + hostprobeProgProbeUnsnat: o.ProbeUnsnat,
	}
}

// Attach starts translating the node's connections to the pod behind
// ifname, a veth peer in the node namespace: it loads a fresh instance of
// the programs, attaches them to the device's egress and ingress and pins
// everything. Either all of it is in place when Attach returns nil, or none
// of it is. Attaching an attached device again is a no-op; when the device
// was re-created under the same name, the stale pins are replaced.
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
	if info, err := readMeta(final); err == nil {
		switch {
		case info.NetnsDev != l.nsid.Dev || info.NetnsIno != l.nsid.Ino:
			return Status{}, fmt.Errorf("attach %s: %w in another network namespace", ifname, ErrAttached)
		case int(info.Ifindex) == ifindex:
			return l.status(ifname)
		}
		l.log.Info("device re-created: replacing its stale translation", "interface", ifname,
			"old_ifindex", info.Ifindex, "ifindex", ifindex)
		if err := l.detachDir(final); err != nil {
			return Status{}, fmt.Errorf("attach %s: remove stale pins: %w", ifname, err)
		}
	} else if _, serr := os.Stat(final); serr == nil {
		return Status{}, fmt.Errorf("attach %s: unreadable pins in %s: %w", ifname, final, err)
	}

	tmp, err := os.MkdirTemp(filepath.Join(l.root, tmpSubDir), ifname+"-")
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: create pin dir: %w", ifname, err)
	}
	var (
		o     *hostprobeObjects
		links []link.Link
		info  hostprobeProbeInfo
		tc    bool // clsact filters may exist
	)
	// Undo on failure: links are detached explicitly, filters deleted, the
	// pins removed and our handles closed.
	defer func() {
		if err == nil {
			return
		}
		errs := []error{os.RemoveAll(tmp)}
		for _, lk := range links {
			errs = append(errs, lk.Detach(), lk.Close())
		}
		if tc {
			errs = append(errs, l.ns.Do(func() error { return clsactDetach(&info) }))
		}
		if o != nil {
			errs = append(errs, o.Close())
		}
		if cerr := errors.Join(errs...); cerr != nil {
			err = fmt.Errorf("%w (cleanup: %v)", err, cerr)
		}
	}()

	if o, err = l.load(); err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", ifname, err)
	}
	for name, m := range o.mapsByPin() {
		if err := m.Pin(filepath.Join(tmp, name)); err != nil {
			return Status{}, fmt.Errorf("attach %s: pin %s: %w", ifname, name, err)
		}
	}
	bpffs.CopyCString(info.Ifname[:], ifname)
	info.NetnsDev, info.NetnsIno = l.nsid.Dev, l.nsid.Ino
	info.Ifindex = uint32(ifindex)
	info.Mode = uint32(l.mode)
	info.ProgramTag = l.tag
	info.AttachedUnixNs = uint64(time.Now().UnixNano())

	// Recorded before attaching, so a crash from here on leaves enough in
	// the temporary pins for Prune to undo it.
	if err := o.ProbeMeta.Put(uint32(0), info); err != nil {
		return Status{}, fmt.Errorf("attach %s: write meta: %w", ifname, err)
	}
	err = l.ns.Do(func() error {
		switch l.mode {
		case tcattach.ModeTCX:
			ls, err := tcattach.AttachTCX(tcHooks(ifindex, o))
			links = append(links, ls...)
			return err
		case tcattach.ModeClsact:
			tc = true
			return clsactAttach(&info, ifindex, o)
		}
		return fmt.Errorf("unknown attach mode %v", l.mode)
	})
	if err != nil {
		return Status{}, fmt.Errorf("attach %s: %w", ifname, err)
	}
	if l.mode == tcattach.ModeTCX {
		for i, name := range []string{pinLinkEgress, pinLinkIngress} {
			if err := links[i].Pin(filepath.Join(tmp, name)); err != nil {
				return Status{}, fmt.Errorf("attach %s: pin %s: %w", ifname, name, err)
			}
		}
	} else {
		for name, prog := range o.programsByPin() {
			if err := prog.Pin(filepath.Join(tmp, name)); err != nil {
				return Status{}, fmt.Errorf("attach %s: pin %s: %w", ifname, name, err)
			}
		}
	}
	if err := o.ProbeMeta.Put(uint32(0), info); err != nil {
		return Status{}, fmt.Errorf("attach %s: write meta: %w", ifname, err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return Status{}, fmt.Errorf("attach %s: publish pins: %w", ifname, err)
	}
	// The pins hold everything now; our handles can go.
	for _, lk := range links {
		lk.Close()
	}
	o.Close()
	l.log.Info("probe snat attached", "interface", ifname, "ifindex", ifindex, "mode", l.mode.String(),
		"took", time.Since(start))
	return l.status(ifname)
}

// Detach stops the translation on ifname: it detaches the programs
// (explicitly, so no packet is translated once Detach returns), deletes
// the clsact filters (and the qdisc, if Attach created it and nobody
// else's filters remain) and removes the pins. Connections translated so
// far lose their translation. A device that is gone is fine; one that was
// never attached gives ErrNotAttached.
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
	if err := l.detachDir(dir); err != nil {
		return fmt.Errorf("detach %s: %w", ifname, err)
	}
	l.log.Info("probe snat detached", "interface", ifname)
	return nil
}

func notAttached(err error) error { return bpffs.MissingAs(err, ErrNotAttached) }

// detachDir undoes one device directory; the caller holds the lock.
func (l *Loader) detachDir(dir string) error {
	var errs []error
	info, err := readMeta(dir)
	switch {
	case errors.Is(err, errUnwritten) || errors.Is(err, fs.ErrNotExist):
		// An attach that stopped before attaching anything.
	case err != nil:
		errs = append(errs, err)
	case info.NetnsDev != l.nsid.Dev || info.NetnsIno != l.nsid.Ino:
		return fmt.Errorf("%s belongs to another network namespace (dev=%d ino=%d)", dir, info.NetnsDev, info.NetnsIno)
	case info.Mode == modeClsact:
		errs = append(errs, l.ns.Do(func() error { return clsactDetach(&info) }))
	}
	// Detach explicitly: dropping the last reference to a link (unpinning)
	// releases it from a workqueue, so packets would still be translated
	// for a moment after Detach returned.
	for _, name := range []string{pinLinkEgress, pinLinkIngress} {
		path := filepath.Join(dir, name)
		if _, err := os.Stat(path); err == nil {
			errs = append(errs, tcattach.DetachPinned(path))
		}
	}
	errs = append(errs, os.RemoveAll(dir))
	return errors.Join(errs...)
}

// errUnwritten: the meta of an attach that stopped before recording anything.
var errUnwritten = errors.New("meta not written")

func readMeta(dir string) (hostprobeProbeInfo, error) {
	var info hostprobeProbeInfo
	if err := bpffs.ReadSingle(dir, hostprobeMapProbeMeta, &info); err != nil {
		return info, err
	}
	if info.Mode == 0 {
		return info, fmt.Errorf("read meta in %s: %w", dir, errUnwritten)
	}
	return info, nil
}

// Prune removes leftovers, for use when a process starts: attaches that
// never finished, and devices that are gone (a pod's veth goes with its
// netns, detaching its tcx links; the pins would stay). It returns the
// names of the devices removed.
func (l *Loader) Prune() ([]string, error) {
	unlock, err := l.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	var errs []error
	tmps, err := os.ReadDir(filepath.Join(l.root, tmpSubDir))
	if err != nil {
		return nil, fmt.Errorf("prune: %w", err)
	}
	for _, t := range tmps {
		l.log.Warn("removing an unfinished probe snat attach", "dir", t.Name())
		errs = append(errs, l.detachDir(filepath.Join(l.root, tmpSubDir, t.Name())))
	}
	names, err := l.names()
	if err != nil {
		return nil, err
	}
	var removed []string
	for _, name := range names {
		st, err := l.status(name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if st.DevicePresent {
			continue
		}
		if err := l.detachDir(l.Dir(name)); err != nil {
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
func (l *Loader) List() ([]Status, error) {
	names, err := l.names()
	if err != nil {
		return nil, err
	}
	out := make([]Status, 0, len(names))
	for _, name := range names {
		st, err := l.status(name)
		if err != nil {
			return nil, err
		}
		out = append(out, st)
	}
	return out, nil
}

func (l *Loader) status(ifname string) (Status, error) {
	dir := l.Dir(ifname)
	info, err := readMeta(dir)
	if err != nil {
		return Status{}, fmt.Errorf("status %s: %w", ifname, notAttached(err))
	}
	st := Status{
		Interface:  bpffs.CString(info.Ifname[:]),
		Ifindex:    info.Ifindex,
		Netns:      netns.ID{Dev: info.NetnsDev, Ino: info.NetnsIno},
		Mode:       tcattach.Mode(info.Mode).String(),
		AttachedAt: time.Unix(0, int64(info.AttachedUnixNs)),
		ProgramTag: hex.EncodeToString(info.ProgramTag[:]),
		PinDir:     dir,
	}
	var c hostprobeProbeCounters
	if err := bpffs.ReadSingle(dir, hostprobeMapProbeStats, &c); err != nil {
		return Status{}, fmt.Errorf("status %s: %w", ifname, err)
	}
	st.Counters = Counters{Translated: c.Translated, Replaced: c.Replaced, Refused: c.Refused,
		NotLocal: c.NotLocal, NotOwned: c.NotOwned, Restored: c.Restored}
	if st.Netns != l.nsid {
		return st, nil // another namespace's pins: nothing here to look at
	}
	var attached int
	err = l.ns.Do(func() error {
		idx, err := tcattach.InterfaceIndex(st.Interface)
		st.DevicePresent = err == nil && uint32(idx) == info.Ifindex
		if !st.DevicePresent {
			return nil
		}
		switch info.Mode {
		case modeTCX:
			for _, name := range []string{pinLinkEgress, pinLinkIngress} {
				if tcattach.PinnedLinkState(filepath.Join(dir, name)).Attached {
					attached++
				}
			}
		case modeClsact:
			n, err := clsactPresent(int(info.Ifindex))
			attached = n
			return err
		}
		return nil
	})
	if err != nil {
		return Status{}, fmt.Errorf("status %s: %w", ifname, err)
	}
	st.Attached = attached == 2
	return st, nil
}
