//go:build linux

package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/bpfobj"
	"github.com/ambpf/ambpf/pkg/pinset"
)

// The node-wide half of the datapath: one loaded set of the capture
// programs (bpf/capture.c) and their maps, pinned under <root>/node/ and
// shared by every pod. Pods reach the programs through capture_progs, the
// tail-call array their entry programs (bpf/podentry.c) jump through, so
// swapping a slot there swaps the program for every pod at once.

const (
	nodeDir = "node"
	// pinProgArray is the entry programs' tail-call array.
	pinProgArray = podentryMapCaptureProgs
)

// Slots of capture_progs (SLOT_* in bpf/include/ambpf.h): an ABI between
// builds, so an entry program of one build reaches the right body of the
// next.
const (
	slotIngress  = 0
	slotEgress   = 1
	slotLoEgress = 2
)

// Sizes of the node-wide maps when Config gives none (DEFAULT_* in
// bpf/include/ambpf.h).
const (
	DefaultMaxPods        = 1024
	DefaultDirectFlows    = 16384
	DefaultInboundPending = 8192
	DefaultDNSNAT         = 16384
	// DefaultDirectFlowsPerPod is a pod's share of DirectFlows.
	DefaultDirectFlowsPerPod = 4096
)

// MapSizes are the capacities of the node-wide maps, shared by every pod
// of the node. Zero fields take the defaults. Changing a size on a node
// that runs migrates the map at the next load of the programs (entries are
// carried over, as far as they fit).
type MapSizes struct {
	// MaxPods bounds how many pods can be enrolled at once: the size of
	// the per-pod arrays (config, counters, meta).
	MaxPods uint32
	// DirectFlows is how many uncaptured TCP flows (open at enrolment,
	// bypassed inbound) the node tracks, over all pods. Memory follows
	// the flows present, not the capacity (no preallocation).
	DirectFlows uint32
	// InboundPending is how many bypassed inbound handshakes are tracked
	// at once (an LRU).
	InboundPending uint32
	// DNSNAT is how many captured DNS exchanges are remembered for
	// rewriting answers (an LRU).
	DNSNAT uint32
	// DirectFlowsPerPod bounds one pod's entries in DirectFlows, so that
	// connections flooding one pod (bypass-inbound) cannot take the room
	// of the others: past it the pod's new bypassed flows are refused
	// (direct_full), never another pod's.
	DirectFlowsPerPod uint32
}

func (s MapSizes) withDefaults() MapSizes {
	def := func(v *uint32, d uint32) {
		if *v == 0 {
			*v = d
		}
	}
	def(&s.MaxPods, DefaultMaxPods)
	def(&s.DirectFlows, DefaultDirectFlows)
	def(&s.InboundPending, DefaultInboundPending)
	def(&s.DNSNAT, DefaultDNSNAT)
	def(&s.DirectFlowsPerPod, min(DefaultDirectFlowsPerPod, s.DirectFlows))
	return s
}

// sizeSpecs sets the map sizes in both objects' specs; pod_counters is in
// both and must agree, or the entry programs could not share it.
func sizeSpecs(capture, entry *ebpf.CollectionSpec, s MapSizes) {
	for name, n := range map[string]uint32{
		captureMapPodConfig: s.MaxPods, captureMapPodCounters: s.MaxPods, captureMapPodMeta: s.MaxPods,
		captureMapDirectFlows: s.DirectFlows, captureMapInboundPending: s.InboundPending, captureMapDnsNat: s.DNSNAT,
	} {
		capture.Maps[name].MaxEntries = n
	}
	entry.Maps[podentryMapPodCounters].MaxEntries = s.MaxPods
}

// sameSizes reports whether the node's maps were made with the sizes of s.
func (n captureNodeInfo) sameSizes(s MapSizes) bool {
	return n.MaxPods == s.MaxPods && n.DirectFlows == s.DirectFlows && n.InboundPending == s.InboundPending && n.DnsNat == s.DNSNAT
}

func (l *Loader) nodeDir() string { return filepath.Join(l.root, nodeDir) }

// nodeMapNames are the capture object's maps that live in <root>/node:
// all but the data sections and the maps pinned by name at the root, in
// pin order: node_meta (what runs) last, the others by name.
func (l *Loader) nodeMapNames() []string {
	var out []string
	for name, ms := range l.spec.Maps {
		if name == ".rodata" || name == ".data" || name == ".bss" || name == "__license" || name == captureMapNodeMeta || ms.Pinning == ebpf.PinByName {
			continue
		}
		out = append(out, name)
	}
	sort.Strings(out)
	return append(out, captureMapNodeMeta)
}

// bodySlots are the shared programs by capture_progs slot, with their pins.
func (o *objects) bodySlots() []struct {
	slot uint32
	pin  string
	prog *ebpf.Program
} {
	return []struct {
		slot uint32
		pin  string
		prog *ebpf.Program
	}{
		{slotIngress, "prog_" + captureProgCaptureIngress, o.CaptureIngress},
		{slotEgress, "prog_" + captureProgCaptureEgress, o.CaptureEgress},
		{slotLoEgress, "prog_" + captureProgDnsReply, o.DnsReply},
	}
}

// ensureNode makes <root>/node run this build's programs
// (pinset.Node.Ensure): loads them the first time, and swaps them in for
// every pod when another build's run there (reusing the pinned maps,
// migrating those whose layout or size changed). It returns quickly when
// this build runs already. The caller holds the root lock.
func (l *Loader) ensureNode() error {
	dir := l.nodeDir()
	node := pinset.Node{
		What:    "capture",
		Tag:     l.tag,
		Log:     l.log,
		Dir:     dir,
		Spec:    l.spec,
		Maps:    l.nodeMapNames(),
		Migrate: migrateMap,
		Current: func() bool {
			var meta captureNodeInfo
			err := bpffs.ReadSingle(dir, captureMapNodeMeta, &meta)
			return err == nil && meta.ProgramTag == l.tag && meta.sameSizes(l.sizes)
		},
		Load: func(replace map[string]*ebpf.Map) (pinset.Loaded, error) {
			o, err := l.load(replace)
			if err != nil {
				return pinset.Loaded{}, err
			}
			var pins []pinset.Pin
			for _, s := range o.bodySlots() {
				pins = append(pins, pinset.Pin{Name: s.pin, Obj: s.prog})
			}
			return pinset.Loaded{
				Maps:     o.mapsByName(),
				Programs: pins,
				// Each slot swaps atomically for every pod, in slot
				// order; in-flight packets finish on the program they
				// started in.
				Switch: func() error {
					progs, err := l.openOrCreate(filepath.Join(dir, pinProgArray), l.entrySpec.Maps[podentryMapCaptureProgs])
					if err != nil {
						return err
					}
					defer progs.Close()
					for _, s := range o.bodySlots() {
						if err := progs.Put(s.slot, s.prog); err != nil {
							return fmt.Errorf("install %s: %w", s.pin, err)
						}
					}
					return nil
				},
				Commit: func() error {
					return o.NodeMeta.Put(uint32(0), captureNodeInfo{
						ProgramTag: l.tag, LoadedUnixNs: uint64(time.Now().UnixNano()),
						MaxPods: l.sizes.MaxPods, DirectFlows: l.sizes.DirectFlows,
						InboundPending: l.sizes.InboundPending, DnsNat: l.sizes.DNSNAT,
					})
				},
				Close: func() { o.Close() },
			}, nil
		},
	}
	return node.Ensure()
}

// openOrCreate opens the map pinned at path, or creates it from spec and
// pins it there.
func (l *Loader) openOrCreate(path string, spec *ebpf.MapSpec) (*ebpf.Map, error) {
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err == nil {
		return m, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	m, err = ebpf.NewMap(spec.Copy())
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", filepath.Base(path), err)
	}
	if err := m.Pin(path); err != nil {
		m.Close()
		return nil, fmt.Errorf("pin %s: %w", path, err)
	}
	return m, nil
}

// nodeMaps are the node-wide maps a pod operation works on. A Loader
// keeps one set of handles open between operations (nodeCache) and hands
// it out to each; Close gives an operation's reference back.
type nodeMaps struct {
	progs, config, counters, meta, flows, pending, dns *ebpf.Map
	// nodeMeta and gen tell whether the handles still are the node's:
	// gen is the node_meta pin's inode and load time when they were
	// opened.
	nodeMeta *ebpf.Map
	gen      nodeGen
	cache    *nodeCache
	refs     int  // operations using the handles; guarded by cache.mu
	stale    bool // no longer the cache's; closed by the last Close
}

// nodeGen identifies one load of the node's programs and maps: the inode
// of the node_meta pin (a new pin when node_meta is created or migrated,
// or the node removed and loaded again) and the load time pinset.Node's
// Commit writes into it (new at every load, which reuses or migrates the
// other maps).
type nodeGen struct {
	ino, loadedNs uint64
}

// nodeCache is a Loader's open handles of the node's maps. Opening the
// seven pins was a fifth of an enrolment's CPU (each pin is an
// BPF_OBJ_GET, an info call and a readlink), and it happened under the
// node lock, so a burst queued on it; docs/BENCHMARKS.md, "Burst
// enrolment, third round".
type nodeCache struct {
	mu  sync.Mutex
	cur *nodeMaps
}

// openNode returns the node's maps: the handles this Loader holds when
// they still are the pinned ones (one stat and one lookup to tell),
// otherwise freshly opened pins, which then replace them. The node must
// have been loaded (ensureNode); a missing pin means no pod was ever
// enrolled here. A swap of the node's programs by another process while
// the caller works on the handles is the same race as opening the pins
// was: Attach checks under the node lock, which a swap holds.
func (l *Loader) openNode() (*nodeMaps, error) {
	c := &l.nodes
	dir := l.nodeDir()
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(dir, captureMapNodeMeta), &st); err != nil {
		c.replace(nil) // removed (an uninstall): let the maps go
		return nil, fmt.Errorf("open node map %s: %w", captureMapNodeMeta, err)
	}
	c.mu.Lock()
	if n := c.cur; n != nil && n.gen.ino == st.Ino {
		var meta captureNodeInfo
		if err := n.nodeMeta.Lookup(uint32(0), &meta); err == nil && meta.LoadedUnixNs == n.gen.loadedNs {
			n.refs++
			c.mu.Unlock()
			return n, nil
		}
	}
	c.mu.Unlock()
	// Opened in this order, a swap that happens meanwhile leaves handles
	// labelled older than they are, which the next call opens again.
	n := &nodeMaps{cache: c, refs: 1, gen: nodeGen{ino: st.Ino}}
	for _, e := range []struct {
		name string
		m    **ebpf.Map
	}{
		{captureMapNodeMeta, &n.nodeMeta},
		{pinProgArray, &n.progs}, {captureMapPodConfig, &n.config}, {captureMapPodCounters, &n.counters},
		{captureMapPodMeta, &n.meta}, {captureMapDirectFlows, &n.flows},
		{captureMapInboundPending, &n.pending}, {captureMapDnsNat, &n.dns},
	} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, e.name), nil)
		if err != nil {
			n.closeMaps()
			return nil, fmt.Errorf("open node map %s: %w", e.name, err)
		}
		*e.m = m
		if e.m == &n.nodeMeta {
			var meta captureNodeInfo
			if err := m.Lookup(uint32(0), &meta); err != nil {
				n.closeMaps()
				return nil, fmt.Errorf("read %s: %w", captureMapNodeMeta, err)
			}
			n.gen.loadedNs = meta.LoadedUnixNs
		}
	}
	c.replace(n)
	return n, nil
}

// replace makes n the cached handles (nil: none), closing the previous
// ones once no operation uses them.
func (c *nodeCache) replace(n *nodeMaps) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if old := c.cur; old != nil && old != n {
		old.stale = true
		if old.refs == 0 {
			old.closeMaps()
		}
	}
	c.cur = n
}

// current reports whether the handles are of this build's programs at
// the Loader's sizes (pinset.Node's Current, read through the open
// node_meta instead of its pin).
func (n *nodeMaps) current(l *Loader) bool {
	var meta captureNodeInfo
	return n.nodeMeta.Lookup(uint32(0), &meta) == nil && meta.ProgramTag == l.tag && meta.sameSizes(l.sizes)
}

// Close gives the operation's reference back; the handles stay open for
// the next operation unless they were replaced meanwhile.
func (n *nodeMaps) Close() {
	n.cache.mu.Lock()
	defer n.cache.mu.Unlock()
	n.refs--
	if n.refs == 0 && n.stale {
		n.closeMaps()
	}
}

func (n *nodeMaps) closeMaps() {
	for _, m := range []*ebpf.Map{n.nodeMeta, n.progs, n.config, n.counters, n.meta, n.flows, n.pending, n.dns} {
		if m != nil {
			m.Close()
		}
	}
}

// allocIndex reserves a free pod index for uid by writing its meta entry:
// the hinted one when it is free (one lookup; hint is the index after the
// last this process took, or the last it freed, and only a hint: other
// processes allocate too), else the lowest free one
// (reading all of pod_meta, about 0.4 ms at the default size, which a
// burst of enrolments would pay for every pod). The caller holds the root
// lock.
func (n *nodeMaps) allocIndex(uid string, max uint32, hint *atomic.Uint32) (uint32, error) {
	take := func(i uint32) (uint32, error) {
		var info capturePodInfo
		bpffs.CopyCString(info.Uid[:], uid)
		if err := n.meta.Put(i, info); err != nil {
			return 0, fmt.Errorf("reserve pod_meta[%d]: %w", i, err)
		}
		hint.Store(i + 1)
		return i, nil
	}
	if h := hint.Load(); h < max {
		var info capturePodInfo
		if err := n.meta.Lookup(h, &info); err != nil {
			return 0, fmt.Errorf("read pod_meta[%d]: %w", h, err)
		}
		if info.Uid[0] == 0 {
			return take(h)
		}
	}
	metas, err := n.allMeta()
	if err != nil {
		return 0, err
	}
	for i := uint32(0); i < max && int(i) < len(metas); i++ {
		if metas[i].Uid[0] == 0 {
			return take(i)
		}
	}
	return 0, fmt.Errorf("%w: all %d pod slots in use (raise the loader's MaxPods)", ErrFull, max)
}

// allMeta reads the whole pod_meta array in a few batch syscalls (one
// lookup per index would cost a syscall per pod slot).
func (n *nodeMaps) allMeta() ([]capturePodInfo, error) {
	size := int(n.meta.MaxEntries())
	out := make([]capturePodInfo, 0, size)
	keys := make([]uint32, 256)
	vals := make([]capturePodInfo, 256)
	var cursor ebpf.MapBatchCursor
	for {
		c, err := n.meta.BatchLookup(&cursor, keys, vals, nil)
		out = append(out, vals[:c]...)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break // the end of the array
		}
		if err != nil {
			return nil, fmt.Errorf("read pod_meta: %w", err)
		}
	}
	if len(out) != size {
		return nil, fmt.Errorf("read pod_meta: %d of %d entries", len(out), size)
	}
	return out, nil
}

// release forgets everything the node holds for the pod at idx: its flows,
// DNS exchanges and pending handshakes, then its options, counters and
// meta (which frees the index). The pod's programs must be detached.
func (n *nodeMaps) release(idx uint32) error {
	errs := []error{
		deleteWhere(n.flows, func(k *captureFlow) bool { return k.Pod == idx }),
		deleteWhere(n.pending, func(k *captureFlow) bool { return k.Pod == idx }),
		deleteWhere(n.dns, func(k *captureDnsKey) bool { return k.Pod == idx }),
		n.config.Put(idx, captureConfig{}),
		n.counters.Put(idx, captureCounters{}),
		n.meta.Put(idx, capturePodInfo{}),
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("release pod index %d: %w", idx, err)
	}
	return nil
}

// deleteWhere deletes the entries of m whose key matches. Entries that go
// meanwhile (the programs delete and evict too) are no error.
func deleteWhere[K any](m *ebpf.Map, match func(*K) bool) error {
	var (
		k    K
		keys []K
	)
	it := m.Iterate()
	discard := make([]byte, m.ValueSize())
	for it.Next(&k, discard) {
		if match(&k) {
			keys = append(keys, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read %s: %w", mapName(m), err)
	}
	for i := range keys {
		if err := m.Delete(&keys[i]); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete from %s: %w", mapName(m), err)
		}
	}
	return nil
}

func mapName(m *ebpf.Map) string {
	if info, err := m.Info(); err == nil {
		return info.Name
	}
	return "map"
}

// loadNodeBody is bpfobj.Load for the capture object.
func loadNodeBody(spec *ebpf.CollectionSpec, o *objects, opts *ebpf.CollectionOptions) error {
	return bpfobj.Load(spec, &o.captureObjects, opts, "capture")
}
