//go:build linux

package probesnat

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"

	"github.com/ambpf/ambpf/pkg/bpffs"
)

// Devices attached by a build from before the node-wide programs (per-pod
// builds) have their own programs and maps pinned in their directory:
// probe_nat, probe_stats and probe_meta (one-entry arrays), the tcx link
// pins (tcx mode) or prog_probe_* (clsact mode, the filters' programs).
// migrateLegacy moves such a device onto the node's programs in place: its
// counters and meta go into the node maps under its ifindex and its
// translations into the node's probe_nat, then its hooks are switched to
// the node's programs, then the translations made meanwhile are copied
// once more, and the old pins go. Only probe_meta's presence marks a
// directory as legacy, and it is removed last, so a crash half-way leaves
// a device Verify migrates again.

func isLegacy(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, hostprobeMapProbeMeta))
	return err == nil
}

// legacyPins are a per-pod build's pins other than its links, probe_meta
// last.
var legacyPins = []string{"prog_" + hostprobeProgProbeSnat, "prog_" + hostprobeProgProbeUnsnat,
	hostprobeMapProbeNat, hostprobeMapProbeStats, hostprobeMapProbeMeta}

// errUnwritten: the meta of an attach that stopped before recording anything.
var errUnwritten = errors.New("meta not written")

func readLegacyMeta(dir string) (hostprobeProbeInfo, error) {
	var info hostprobeProbeInfo
	if err := bpffs.ReadSingle(dir, hostprobeMapProbeMeta, &info); err != nil {
		return info, err
	}
	if info.Mode == 0 {
		return info, fmt.Errorf("read meta in %s: %w", dir, errUnwritten)
	}
	return info, nil
}

// migrateLegacy moves a per-pod build's device onto the node's programs.
// The caller holds the lock and has run ensureNode.
func (l *Loader) migrateLegacy(ifname string) (err error) {
	dir := l.Dir(ifname)
	info, err := readLegacyMeta(dir)
	if errors.Is(err, errUnwritten) {
		// A per-pod attach that stopped before attaching anything.
		return l.detachLegacy(dir)
	}
	if err != nil {
		return fmt.Errorf("migrate %s: %w", ifname, err)
	}
	if info.NetnsDev != l.nsid.Dev || info.NetnsIno != l.nsid.Ino {
		return fmt.Errorf("migrate %s: belongs to another network namespace", ifname)
	}
	n, err := l.openNode()
	if err != nil {
		return fmt.Errorf("migrate %s: %w", ifname, err)
	}
	defer n.Close()
	progs, err := l.openPrograms()
	if err != nil {
		return fmt.Errorf("migrate %s: %w", ifname, err)
	}
	defer progs.Close()
	switched := false
	defer func() {
		// Until the hooks run the node's programs, the device runs
		// entirely on its own pins: forgetting its entries undoes it all.
		if err != nil && !switched {
			n.forget(info.Ifindex)
		}
	}()
	var c hostprobeProbeCounters
	if err := bpffs.ReadSingle(dir, hostprobeMapProbeStats, &c); err != nil {
		return fmt.Errorf("migrate %s: %w", ifname, err)
	}
	if err := n.stats.Put(info.Ifindex, c); err != nil {
		return fmt.Errorf("migrate %s: write counters: %w", ifname, err)
	}
	info.ProgramTag = l.tag
	if err := n.meta.Put(info.Ifindex, info); err != nil {
		return fmt.Errorf("migrate %s: write meta: %w", ifname, err)
	}
	if err := copyNAT(dir, n.nat); err != nil {
		return fmt.Errorf("migrate %s: %w", ifname, err)
	}
	if err := l.swap(dir, info, progs); err != nil {
		return fmt.Errorf("migrate %s: %w", ifname, err)
	}
	switched = true
	// Connections the old programs translated while we copied.
	if err := copyNAT(dir, n.nat); err != nil {
		l.log.Warn("migrate: second copy of the translations", "interface", ifname, "err", err)
	}
	// The counts the old programs made meanwhile are lost; the old
	// stats are only read once, before the switch.
	var errs []error
	for _, name := range legacyPins {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("migrate %s: remove the per-pod pins: %w", ifname, err)
	}
	l.log.Info("probe snat device migrated onto the node's programs", "interface", ifname, "ifindex", info.Ifindex)
	return nil
}

// copyNAT copies a per-pod build's translations (same key and value
// layout: the key was always unique on the node) into the node's.
func copyNAT(dir string, to *ebpf.Map) error {
	old, err := ebpf.LoadPinnedMap(filepath.Join(dir, hostprobeMapProbeNat), nil)
	if err != nil {
		return fmt.Errorf("open the old probe_nat: %w", err)
	}
	defer old.Close()
	var (
		k hostprobeProbeKey
		v hostprobeProbeOrig
	)
	it := old.Iterate()
	for it.Next(&k, &v) {
		if err := to.Update(&k, &v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("copy a translation: %w", err)
		}
	}
	return it.Err()
}

// detachLegacy undoes a per-pod build's device directory; the caller
// holds the lock.
func (l *Loader) detachLegacy(dir string) error {
	var errs []error
	info, err := readLegacyMeta(dir)
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
	errs = append(errs, l.detachLinks(dir))
	return errors.Join(errs...)
}

// legacyStatus reads a per-pod build's device from its own pins.
func (l *Loader) legacyStatus(ifname string) (Status, error) {
	dir := l.Dir(ifname)
	info, err := readLegacyMeta(dir)
	if err != nil {
		return Status{}, fmt.Errorf("status %s: %w", ifname, notAttached(err))
	}
	var c hostprobeProbeCounters
	if err := bpffs.ReadSingle(dir, hostprobeMapProbeStats, &c); err != nil {
		return Status{}, fmt.Errorf("status %s: %w", ifname, err)
	}
	return l.statusOf(dir, info, c)
}
