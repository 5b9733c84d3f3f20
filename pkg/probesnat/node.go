//go:build linux

package probesnat

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/bpfobj"
	"github.com/ambpf/ambpf/pkg/pinset"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// The node-wide half: one loaded set of the programs and their maps,
// pinned under <root>/hostprobe_node/ and attached to every interface.
// probe_nat's key is unique on the node; probe_stats and probe_meta are
// keyed by ifindex, unique in the node namespace (where all the hooks
// are).

// Sizes of the node-wide maps when Config gives none (DEFAULT_PROBE_* in
// bpf/hostprobe.c).
const (
	DefaultNATEntries    = 65536
	DefaultMaxInterfaces = 1024
)

// nodeMapNames are the maps pinned in the node directory, probe_node
// (what runs) last.
var nodeMapNames = []string{hostprobeMapProbeNat, hostprobeMapProbeStats, hostprobeMapProbeMeta, hostprobeMapProbeNode}

func (p programs) Close() {
	for _, prog := range p {
		prog.Close()
	}
}

// NodeDir is where the node's programs and maps are pinned.
func (l *Loader) NodeDir() string { return filepath.Join(l.root, nodeSubDir) }

// nodeMaps are the node-wide maps an interface operation works on.
type nodeMaps struct {
	nat, stats, meta *ebpf.Map
}

func (n *nodeMaps) Close() {
	for _, m := range []*ebpf.Map{n.nat, n.stats, n.meta} {
		if m != nil {
			m.Close()
		}
	}
}

// openNode opens the node's pinned maps; a missing pin (nothing was ever
// attached with this build's layout) gives an error satisfying
// errors.Is(err, fs.ErrNotExist).
func (l *Loader) openNode() (*nodeMaps, error) {
	n := &nodeMaps{}
	for _, e := range []struct {
		name string
		to   **ebpf.Map
	}{{hostprobeMapProbeNat, &n.nat}, {hostprobeMapProbeStats, &n.stats}, {hostprobeMapProbeMeta, &n.meta}} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(l.NodeDir(), e.name), nil)
		if err != nil {
			n.Close()
			return nil, fmt.Errorf("open node map %s: %w", e.name, err)
		}
		*e.to = m
	}
	return n, nil
}

// openPrograms opens the node's pinned programs (the hook table's
// program pins).
func (l *Loader) openPrograms() (programs, error) {
	p := programs{}
	for _, h := range hooks.Hooks {
		prog, err := ebpf.LoadPinnedProgram(filepath.Join(l.NodeDir(), h.ProgPin()), nil)
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("open node program: %w", err)
		}
		p[h.Program] = prog
	}
	return p, nil
}

// attached is one interface's entry in probe_meta.
type attached struct {
	ifindex uint32
	info    hostprobeProbeInfo
}

// entries lists probe_meta: what is attached (or being attached) on the
// node.
func (n *nodeMaps) entries() ([]attached, error) {
	var (
		out []attached
		k   uint32
		v   hostprobeProbeInfo
	)
	it := n.meta.Iterate()
	for it.Next(&k, &v) {
		out = append(out, attached{k, v})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list probe_meta: %w", err)
	}
	return out, nil
}

// find returns the entry recorded for ifname.
func (n *nodeMaps) find(ifname string) (attached, bool, error) {
	all, err := n.entries()
	if err != nil {
		return attached{}, false, err
	}
	for _, a := range all {
		if bpffs.CString(a.info.Ifname[:]) == ifname {
			return a, true, nil
		}
	}
	return attached{}, false, nil
}

// forget deletes an interface's entries in the node maps. Its probe_nat
// entries stay to age out of the LRU: their key has no interface (the
// loader does not know the pod's address), and a stale one is harmless:
// a SYN of a host connection overwrites it, later packets are only
// translated while a host socket owns their 4-tuple, and a reply is only
// given back a host address when it goes to the probe address, which
// only connections translated since took.
func (n *nodeMaps) forget(ifindex uint32) error {
	var errs []error
	for _, m := range []*ebpf.Map{n.meta, n.stats} {
		if err := m.Delete(ifindex); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (s Config) sizes() (nat, ifaces uint32) {
	nat, ifaces = s.NATEntries, s.MaxInterfaces
	if nat == 0 {
		nat = DefaultNATEntries
	}
	if ifaces == 0 {
		ifaces = DefaultMaxInterfaces
	}
	return nat, ifaces
}

// ensureNode makes the node directory run this build's programs with the
// configured sizes (pinset.Node.Ensure): loads them the first time; when
// another build (or other sizes) runs there, loads this build reusing the
// pinned maps (migrating those whose layout or size changed) and swaps
// the programs on every attached interface, hook by hook in table order
// (tcx links updated, clsact filters replaced: atomic per hook, so no
// packet misses translation), recording the build in each interface's
// meta. It returns quickly when this build runs already. The caller holds
// the lock.
func (l *Loader) ensureNode() error {
	dir := l.NodeDir()
	node := pinset.Node{
		What: "probe snat",
		Tag:  l.tag,
		Log:  l.log,
		Dir:  dir,
		Spec: l.spec,
		Maps: nodeMapNames,
		Current: func() bool {
			var meta hostprobeProbeNodeInfo
			err := bpffs.ReadSingle(dir, hostprobeMapProbeNode, &meta)
			return err == nil && meta.ProgramTag == l.tag && meta.NatEntries == l.natEntries && meta.MaxInterfaces == l.maxIfaces
		},
		Load: func(replace map[string]*ebpf.Map) (pinset.Loaded, error) {
			var o hostprobeObjects
			if err := bpfobj.Load(l.spec, &o, &ebpf.CollectionOptions{MapReplacements: replace}, "probe snat"); err != nil {
				return pinset.Loaded{}, err
			}
			progs := programs{hostprobeProgProbeSnat: o.ProbeSnat, hostprobeProgProbeUnsnat: o.ProbeUnsnat}
			var pins []pinset.Pin
			for _, h := range hooks.Hooks {
				pins = append(pins, pinset.Pin{Name: h.ProgPin(), Obj: progs[h.Program]})
			}
			return pinset.Loaded{
				Maps: map[string]*ebpf.Map{hostprobeMapProbeNat: o.ProbeNat, hostprobeMapProbeStats: o.ProbeStats,
					hostprobeMapProbeMeta: o.ProbeMeta, hostprobeMapProbeNode: o.ProbeNode},
				Programs: pins,
				// Interfaces attached by the previous build switch to
				// this one; the node maps they see are the same (or the
				// migrated copy, pinned next: what the old programs write
				// to the old copy until their device is switched is
				// lost, as in pkg/datapath). A first load has an empty
				// probe_meta: nothing to switch.
				Switch: func() error { return l.swapAll(o.ProbeMeta, progs) },
				Commit: func() error {
					return o.ProbeNode.Put(uint32(0), hostprobeProbeNodeInfo{ProgramTag: l.tag,
						LoadedUnixNs: uint64(time.Now().UnixNano()), NatEntries: l.natEntries, MaxInterfaces: l.maxIfaces})
				},
				Close: func() { o.Close() },
			}, nil
		},
	}
	return node.Ensure()
}

// swapAll makes every interface recorded in meta (and attached in this
// namespace) run progs, and records this build in its entry.
func (l *Loader) swapAll(meta *ebpf.Map, progs programs) error {
	n := &nodeMaps{meta: meta}
	all, err := n.entries()
	if err != nil {
		return err
	}
	var errs []error
	for _, a := range all {
		if a.info.NetnsDev != l.nsid.Dev || a.info.NetnsIno != l.nsid.Ino {
			continue
		}
		if err := l.swap(l.Dir(bpffs.CString(a.info.Ifname[:])), a.info, progs); err != nil {
			errs = append(errs, err)
			continue
		}
		a.info.ProgramTag = l.tag
		if err := meta.Put(a.ifindex, a.info); err != nil {
			errs = append(errs, fmt.Errorf("record the build of %s: %w", bpffs.CString(a.info.Ifname[:]), err))
		}
	}
	return errors.Join(errs...)
}

// swap makes one interface's hooks run progs: its pinned tcx links in dir
// are updated, or its clsact filters replaced (a device that is gone is
// skipped: Prune removes it).
func (l *Loader) swap(dir string, info hostprobeProbeInfo, progs programs) error {
	ifname := bpffs.CString(info.Ifname[:])
	mode := tcattach.Mode(info.Mode)
	err := l.ns.Do(func() error {
		if mode == tcattach.ModeClsact {
			idx, err := tcattach.InterfaceIndex(ifname)
			if err != nil || uint32(idx) != info.Ifindex {
				return nil
			}
		}
		return hooks.Update(tcattach.On(nil), mode, dir, int(info.Ifindex), progs.get, false)
	})
	if err != nil {
		return fmt.Errorf("swap programs on %s: %w", ifname, err)
	}
	return nil
}

// ErrInterfacesAttached is RemoveNodeState's answer while devices are
// attached.
var ErrInterfacesAttached = errors.New("interfaces are still attached")

// RemoveNodeState removes the node's programs and maps once no device is
// attached, for an uninstall: after it, nothing of the probe SNAT is left
// under the root. The next Attach loads them afresh.
func (l *Loader) RemoveNodeState() error {
	unlock, err := l.lock()
	if err != nil {
		return err
	}
	defer unlock()
	names, err := l.names()
	if err != nil {
		return fmt.Errorf("remove node state: %w", err)
	}
	if len(names) > 0 {
		return fmt.Errorf("remove node state: %w (%d)", ErrInterfacesAttached, len(names))
	}
	if err := os.RemoveAll(l.NodeDir()); err != nil {
		return fmt.Errorf("remove node state: %w", err)
	}
	return nil
}
