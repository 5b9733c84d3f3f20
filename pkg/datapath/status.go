//go:build linux

package datapath

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/pinset"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// readPinnedCounters is lookupCounters of the counters map pinned at path.
func readPinnedCounters(path string, idx uint32) (captureCounters, error) {
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		return captureCounters{}, fmt.Errorf("open %s: %w", captureMapPodCounters, err)
	}
	defer m.Close()
	return lookupCounters(m, idx)
}

// lookupCounters reads the counters at idx of m. A map of an older build,
// not upgraded yet, has fewer fields (they are only ever appended): the
// missing ones read as zero.
func lookupCounters(m *ebpf.Map, idx uint32) (captureCounters, error) {
	var c captureCounters
	raw := make([]byte, m.ValueSize())
	if err := m.Lookup(idx, raw); err != nil {
		return c, fmt.Errorf("read %s: %w", captureMapPodCounters, err)
	}
	full := make([]byte, binary.Size(c))
	copy(full, raw)
	if err := binary.Read(bytes.NewReader(full), binary.NativeEndian, &c); err != nil {
		return c, fmt.Errorf("decode %s: %w", captureMapPodCounters, err)
	}
	return c, nil
}

func countersFrom(c captureCounters) Counters {
	return Counters{
		CapturedIn: c.CapturedIn, CapturedOut: c.CapturedOut, CapturedDNS: c.CapturedDns,
		HBONEIn: c.HboneIn, Bypassed: c.Bypassed, Direct: c.Direct,
		DroppedNoListener: c.DroppedNoListener, DroppedNoFlow: c.DroppedNoFlow,
		AssignFailed: c.AssignFailed, MarkRefused: c.MarkRefused,
		DroppedUnparsed: c.DroppedUnparsed, DirectFull: c.DirectFull, MarkUntrusted: c.MarkUntrusted,
	}
}

func (l *Loader) status(uid string) (Status, error) { return l.statusIn(uid, nil) }

// statusIn is status; filters, when not nil, are the pod's clsact filters
// as tcattach.TC.Present reports them, known to the caller (Attach has
// just put them there; its netns is then alive too), so the netns need
// not be found and entered, and its filters dumped, under the node-wide
// RTNL lock.
func (l *Loader) statusIn(uid string, filters map[string]uint32) (Status, error) {
	dir := l.PodDir(uid)
	rec, err := l.record(dir)
	if err != nil {
		return Status{}, fmt.Errorf("status %s: %w", uid, notAttached(err))
	}
	info := rec.info
	st := Status{
		UID:        uid,
		Index:      rec.index,
		Interface:  bpffs.CString(info.Ifname[:]),
		Ifindex:    info.Ifindex,
		Netns:      netns.ID{Dev: info.NetnsDev, Ino: info.NetnsIno},
		CgroupID:   info.CgroupId,
		Mode:       Mode(info.Mode).String(),
		AttachedAt: time.Unix(0, int64(info.AttachedUnixNs)),
		ProgramTag: hex.EncodeToString(info.ProgramTag[:]),
		Current:    info.ProgramTag == l.tag && !rec.legacy,
		PinDir:     dir,
	}
	var (
		cfg captureConfig
		c   captureCounters
	)
	if rec.legacy {
		// A per-pod build keeps its state in the pod's directory, its
		// config a flags word and a reserved one.
		var old [2]captureCfgFlag
		if err := bpffs.ReadIndex(filepath.Join(dir, captureMapPodConfig), 0, &old); err != nil {
			return Status{}, fmt.Errorf("status %s: %w", uid, err)
		}
		cfg.Flags = old[0]
		if c, err = readPinnedCounters(filepath.Join(dir, captureMapPodCounters), 0); err != nil {
			return Status{}, fmt.Errorf("status %s: %w", uid, err)
		}
	} else {
		n, err := l.openNode()
		if err != nil {
			return Status{}, fmt.Errorf("status %s: %w", uid, err)
		}
		defer n.Close()
		if err := n.config.Lookup(rec.index, &cfg); err != nil {
			return Status{}, fmt.Errorf("status %s: read %s: %w", uid, captureMapPodConfig, err)
		}
		if c, err = lookupCounters(n.counters, rec.index); err != nil {
			return Status{}, fmt.Errorf("status %s: %w", uid, err)
		}
	}
	st.Options = optionsFromFlags(cfg.Flags)
	st.Counters = countersFrom(c)
	st.Counters.DirectEntries = c.DirectEntries + cfg.DirectAdjust
	progs := entryProgramNames
	if rec.legacy {
		progs = legacyProgramNames
	}

	switch Mode(info.Mode) {
	case ModeTCX:
		alive := false
		for i, h := range hooks.Hooks {
			at := Attachment{Pin: h.LinkPin, Program: progs[i], Hook: "tcx " + h.Dir.String() + " " + hookDevice(h, st.Interface)}
			setLink(&at, filepath.Join(dir, h.LinkPin))
			alive = alive || at.Attached
			st.Attachments = append(st.Attachments, at)
		}
		// A tcx link detaches when its device goes, and a pod's devices go
		// with its netns: no attached link means no netns.
		st.NetnsAlive = alive
	case ModeClsact:
		present := filters
		list := func(nl *netlink.Handle) (err error) {
			present, err = tcattach.On(nl).Present(hooks.Filters, hooks.TC(int(info.Ifindex), nil))
			return err
		}
		var err error
		if present != nil {
			st.NetnsAlive = true
		} else {
			var ns *netns.NS
			if ns, err = l.findNetns(st.Netns); err == nil {
				st.NetnsAlive = true
				err = inNetns(ns, list)
				ns.Close()
			}
		}
		if err != nil && !errors.Is(err, errNetnsGone) {
			return Status{}, fmt.Errorf("status %s: %w", uid, err)
		}
		for i, h := range hooks.Hooks {
			prog, name := progs[i], h.FilterName()
			st.Attachments = append(st.Attachments, Attachment{
				Pin: "prog_" + prog, Program: prog, Hook: "clsact " + h.Dir.String() + " " + hookDevice(h, st.Interface),
				Attached: present[name] != 0, ProgramID: present[name],
			})
		}
	}
	if _, err := os.Stat(filepath.Join(dir, pinLinkSockopt)); err == nil {
		at := Attachment{Pin: pinLinkSockopt, Program: podentryProgGuardMark, Hook: "cgroup setsockopt"}
		setLink(&at, filepath.Join(dir, pinLinkSockopt))
		st.Attachments = append(st.Attachments, at)
	}
	sort.SliceStable(st.Attachments, func(i, j int) bool { return st.Attachments[i].Pin < st.Attachments[j].Pin })
	return st, nil
}

// hookDevice names the device of a hook of a pod whose interface is ifname.
func hookDevice(h pinset.Hook, ifname string) string {
	if h.Loopback {
		return "lo"
	}
	return ifname
}

// entryProgramNames are the TC programs a pod's hooks run, in hook table
// order.
var entryProgramNames = func() (out [3]string) {
	for i, h := range hooks.Hooks {
		out[i] = h.Program
	}
	return out
}()

// setLink fills a link attachment from the link pinned at path.
func setLink(a *Attachment, path string) {
	ls := tcattach.PinnedLinkState(path)
	a.LinkID, a.ProgramID, a.Attached = ls.LinkID, ls.ProgramID, ls.Attached
}
