//go:build linux

package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/bpffs"
)

// Pods attached by a build from before the node-wide programs (per-pod
// builds) have their own programs and maps pinned in their directory:
// pod_config, pod_counters, pod_meta, direct_flows, inbound_pending and
// dns_nat (one-entry arrays and per-pod tables, keys without a pod index),
// and prog_capture_* in clsact mode. migrateLegacy moves such a pod onto
// the node's programs in place: its state is copied into the node's maps
// under a new index, then its hooks are switched to its entry programs,
// then the state written meanwhile is copied once more, and the old pins
// go. Only pod_meta's presence marks a directory as legacy, and it is
// removed last, so a crash half-way leaves a pod Verify migrates again.

// legacyMaps are a per-pod build's map pins, pod_meta last.
var legacyMaps = []string{captureMapPodConfig, captureMapPodCounters, captureMapDirectFlows,
	captureMapInboundPending, captureMapDnsNat, captureMapPodMeta}

// legacyProgramNames are the programs a per-pod build's hooks run, in
// hook table order.
var legacyProgramNames = [3]string{captureProgCaptureIngress, captureProgCaptureEgress, captureProgDnsReply}

func isLegacy(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, captureMapPodMeta))
	return err == nil
}

func readLegacyMeta(dir string) (capturePodInfo, error) {
	var info capturePodInfo
	err := bpffs.ReadSingle(dir, captureMapPodMeta, &info)
	return info, notAttached(err)
}

// migrateLegacy moves a per-pod build's pod onto the node's programs. The
// caller holds the pod's lock.
func (l *Loader) migrateLegacy(uid string) (err error) {
	dir := l.PodDir(uid)
	info, err := readLegacyMeta(dir)
	if err != nil {
		return fmt.Errorf("migrate %s: %w", uid, err)
	}
	n, idx, err := l.nodeReady(uid, true)
	if err != nil {
		return fmt.Errorf("migrate %s: %w", uid, err)
	}
	defer n.Close()
	switched := false
	defer func() {
		// Until the hooks run the entry programs, the pod still runs
		// entirely on its own pins: giving the index back undoes it all.
		if err != nil && !switched {
			n.release(idx)
		}
	}()
	// Its config was a flags word and a reserved one.
	var oldCfg [2]captureCfgFlag
	if err := bpffs.ReadSingle(dir, captureMapPodConfig, &oldCfg); err != nil {
		return fmt.Errorf("migrate %s: %w", uid, err)
	}
	opts := optionsFromFlags(oldCfg[0])
	if err := n.config.Put(idx, l.podConfig(opts, 0)); err != nil {
		return fmt.Errorf("migrate %s: write config: %w", uid, err)
	}
	c, err := readPinnedCounters(filepath.Join(dir, captureMapPodCounters), 0)
	if err != nil {
		return fmt.Errorf("migrate %s: %w", uid, err)
	}
	if err := n.counters.Put(idx, c); err != nil {
		return fmt.Errorf("migrate %s: write counters: %w", uid, err)
	}
	copied, err := l.copyLegacyTables(dir, n, idx)
	if err != nil {
		return fmt.Errorf("migrate %s: %w", uid, err)
	}
	if err := n.adjustDirect(idx, int64(copied)); err != nil {
		return fmt.Errorf("migrate %s: %w", uid, err)
	}
	meta := info
	meta.ProgramTag = l.tag
	if err := n.meta.Put(idx, meta); err != nil {
		return fmt.Errorf("migrate %s: write meta: %w", uid, err)
	}
	_, serr := os.Stat(filepath.Join(dir, pinLinkSockopt))
	guard := serr == nil
	e, err := l.loadEntry(n, idx, guard)
	if err != nil {
		return fmt.Errorf("migrate %s: %w", uid, err)
	}
	defer e.Close()
	if err := bpffs.PinReplacing(e.index, filepath.Join(dir, pinPodIndex)); err != nil {
		return fmt.Errorf("migrate %s: %w", uid, err)
	}
	if err := l.swapEntry(dir, &meta, e, guard); err != nil {
		os.Remove(filepath.Join(dir, pinPodIndex))
		return fmt.Errorf("migrate %s: switch hooks: %w", uid, err)
	}
	switched = true
	// Flows the old programs recorded while the state was being copied.
	if copied, err := l.copyLegacyTables(dir, n, idx); err != nil {
		l.log.Warn("migrate: second copy of the pod's tables", "uid", uid, "err", err)
	} else if err := n.adjustDirect(idx, int64(copied)); err != nil {
		return fmt.Errorf("migrate %s: %w", uid, err)
	}
	if err := n.meta.Put(idx, meta); err != nil { // clsactAttach may have changed Setup
		return fmt.Errorf("migrate %s: write meta: %w", uid, err)
	}
	var errs []error
	for _, name := range legacyProgramNames {
		if err := os.Remove(filepath.Join(dir, "prog_"+name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	for _, name := range legacyMaps {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("migrate %s: remove the per-pod pins: %w", uid, err)
	}
	l.log.Info("pod migrated onto the node's programs", "uid", uid, "index", idx)
	return nil
}

// copyLegacyTables copies a per-pod build's flow and DNS tables into the
// node's, keys extended with the pod index, and returns how many direct
// flows it added. Entries already there stay; direct flows past the pod's
// share are left out.
func (l *Loader) copyLegacyTables(dir string, n *nodeMaps, idx uint32) (int, error) {
	directs := 0
	for _, t := range []struct {
		name string
		to   *ebpf.Map
	}{
		{captureMapDirectFlows, n.flows}, {captureMapInboundPending, n.pending}, {captureMapDnsNat, n.dns},
	} {
		old, err := ebpf.LoadPinnedMap(filepath.Join(dir, t.name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue // the build had no such table
		}
		if err != nil {
			return directs, fmt.Errorf("open %s: %w", t.name, err)
		}
		direct := t.name == captureMapDirectFlows
		limit := -1
		if direct {
			limit = int(l.sizes.DirectFlowsPerPod)
		}
		added, err := copyIndexed(old, t.to, idx, direct, limit)
		old.Close()
		if direct {
			directs += added
		}
		if err != nil {
			return directs, fmt.Errorf("copy %s: %w", t.name, err)
		}
	}
	return directs, nil
}

// copyIndexed copies old's entries into to, whose keys are old's followed
// by a 4-byte pod index (struct flow, struct dns_key). Values keep their
// leading bytes, except direct_flows values of builds before expiry (8
// bytes), which become attach-time flows with a fresh expiry.
func copyIndexed(old, to *ebpf.Map, idx uint32, direct bool, limit int) (added int, err error) {
	if old.KeySize()+4 != to.KeySize() {
		return 0, fmt.Errorf("key of %d bytes, the node's has %d", old.KeySize(), to.KeySize())
	}
	k, v := make([]byte, old.KeySize()), make([]byte, old.ValueSize())
	it := old.Iterate()
	for it.Next(k, v) {
		nk := make([]byte, to.KeySize())
		copy(nk, k)
		binary.NativeEndian.PutUint32(nk[old.KeySize():], idx)
		var nv any = v
		if len(v) != int(to.ValueSize()) {
			buf := make([]byte, to.ValueSize())
			copy(buf, v)
			nv = buf
		}
		if direct && old.ValueSize() == 8 {
			nv = captureDirectFlow{ExpiresNs: monotonicNow() + uint64(directIdle), Origin: directAttached}
		}
		if limit >= 0 && added >= limit {
			break
		}
		err := to.Update(nk, nv, ebpf.UpdateNoExist)
		if err == nil {
			added++
			continue
		}
		if !errors.Is(err, ebpf.ErrKeyExist) && !errors.Is(err, unix.E2BIG) {
			return added, err
		}
	}
	return added, it.Err()
}
