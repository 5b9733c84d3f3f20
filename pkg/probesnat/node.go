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

// programs are the shared programs, by hook.
type programs struct {
	snat, unsnat *ebpf.Program
}

func (p programs) Close() {
	p.snat.Close()
	p.unsnat.Close()
}

func (p programs) byPin() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{
		"prog_" + hostprobeProgProbeSnat:   p.snat,
		"prog_" + hostprobeProgProbeUnsnat: p.unsnat,
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

// openPrograms opens the node's pinned programs.
func (l *Loader) openPrograms() (programs, error) {
	var p programs
	var err error
	if p.snat, err = ebpf.LoadPinnedProgram(filepath.Join(l.NodeDir(), "prog_"+hostprobeProgProbeSnat), nil); err != nil {
		return p, fmt.Errorf("open node program: %w", err)
	}
	if p.unsnat, err = ebpf.LoadPinnedProgram(filepath.Join(l.NodeDir(), "prog_"+hostprobeProgProbeUnsnat), nil); err != nil {
		p.snat.Close()
		return p, fmt.Errorf("open node program: %w", err)
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
// configured sizes: loads them the first time; when another build (or
// other sizes) runs there, loads this build reusing the pinned maps
// (migrating those whose layout or size changed) and swaps the programs
// on every attached interface (tcx links updated, clsact filters
// replaced: atomic per hook). It returns quickly when this build runs
// already. The caller holds the lock.
func (l *Loader) ensureNode() error {
	dir := l.NodeDir()
	var meta hostprobeProbeNodeInfo
	merr := bpffs.ReadSingle(dir, hostprobeMapProbeNode, &meta)
	if merr == nil && meta.ProgramTag == l.tag && meta.NatEntries == l.natEntries && meta.MaxInterfaces == l.maxIfaces {
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	start := time.Now()
	// Maps new to this build, or migrated: pinned once the programs run.
	reused, err := bpfobj.ReusePinned(l.spec, dir, nodeMapNames, nil)
	if err != nil {
		return fmt.Errorf("node programs: %w", err)
	}
	defer reused.Close()
	replace, repin := reused.Maps, reused.Repin
	var o hostprobeObjects
	if err := bpfobj.Load(l.spec, &o, &ebpf.CollectionOptions{MapReplacements: replace}, "probe snat"); err != nil {
		return fmt.Errorf("node programs: %w", err)
	}
	defer o.Close()
	progs := programs{o.ProbeSnat, o.ProbeUnsnat}
	// Interfaces attached by the previous build switch to this one, hook
	// by hook; the node maps they see are the same (or the migrated copy,
	// pinned below: what the old programs write to the old copy until
	// their device is switched is lost, as in pkg/datapath). A first load
	// has an empty probe_meta: nothing to switch.
	if err := l.swapAll(o.ProbeMeta, progs); err != nil {
		return fmt.Errorf("node programs: %w", err)
	}
	maps := map[string]*ebpf.Map{hostprobeMapProbeNat: o.ProbeNat, hostprobeMapProbeStats: o.ProbeStats,
		hostprobeMapProbeMeta: o.ProbeMeta, hostprobeMapProbeNode: o.ProbeNode}
	for _, name := range repin {
		if err := bpffs.PinReplacing(maps[name], filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("node programs: %w", err)
		}
	}
	for name, p := range progs.byPin() {
		if err := bpffs.PinReplacing(p, filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("node programs: %w", err)
		}
	}
	meta = hostprobeProbeNodeInfo{ProgramTag: l.tag, LoadedUnixNs: uint64(time.Now().UnixNano()),
		NatEntries: l.natEntries, MaxInterfaces: l.maxIfaces}
	if err := o.ProbeNode.Put(uint32(0), meta); err != nil {
		return fmt.Errorf("node programs: write node meta: %w", err)
	}
	l.log.Info("probe snat node programs loaded", "program_tag", fmt.Sprintf("%x", l.tag),
		"migrated_or_new_maps", repin, "took", time.Since(start))
	return nil
}

// swapAll makes every interface recorded in meta (and attached in this
// namespace) run progs.
func (l *Loader) swapAll(meta *ebpf.Map, progs programs) error {
	all, err := (&nodeMaps{meta: meta}).entries()
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
		}
	}
	return errors.Join(errs...)
}

// swap makes one interface's hooks run progs: its pinned tcx links in dir
// are updated, or its clsact filters replaced (a device that is gone is
// skipped: Prune removes it).
func (l *Loader) swap(dir string, info hostprobeProbeInfo, progs programs) error {
	ifname := bpffs.CString(info.Ifname[:])
	hooks := tcHooks(int(info.Ifindex), progs)
	switch info.Mode {
	case modeTCX:
		for i, name := range []string{pinLinkEgress, pinLinkIngress} {
			path := filepath.Join(dir, name)
			if _, err := os.Stat(path); err != nil {
				continue // an attach that did not get that far
			}
			if err := bpffs.UpdatePinnedLink(path, hooks[i].Program); err != nil {
				return fmt.Errorf("swap programs on %s: %w", ifname, err)
			}
		}
	case modeClsact:
		err := l.ns.Do(func() error {
			idx, err := tcattach.InterfaceIndex(ifname)
			if err != nil || uint32(idx) != info.Ifindex {
				return nil
			}
			return clsactFilters.Replace(hooks)
		})
		if err != nil {
			return fmt.Errorf("swap programs on %s: %w", ifname, err)
		}
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
