//go:build linux

package datapath

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/ambpf/ambpf/pkg/netns"
)

// Counters are a pod's datapath counters (bpf/include/ambpf.h explains each).
type Counters struct {
	CapturedIn        uint64 `json:"captured_in"`
	CapturedOut       uint64 `json:"captured_out"`
	CapturedDNS       uint64 `json:"captured_dns"`
	HBONEIn           uint64 `json:"hbone_in"`
	Bypassed          uint64 `json:"bypassed"`
	Direct            uint64 `json:"direct"`
	DroppedNoListener uint64 `json:"dropped_no_listener"`
	DroppedNoFlow     uint64 `json:"dropped_no_flow"`
	AssignFailed      uint64 `json:"assign_failed"`
	MarkRefused       uint64 `json:"mark_refused"`
}

func countersFrom(c captureCounters) Counters {
	return Counters{
		CapturedIn: c.CapturedIn, CapturedOut: c.CapturedOut, CapturedDNS: c.CapturedDns,
		HBONEIn: c.HboneIn, Bypassed: c.Bypassed, Direct: c.Direct,
		DroppedNoListener: c.DroppedNoListener, DroppedNoFlow: c.DroppedNoFlow,
		AssignFailed: c.AssignFailed, MarkRefused: c.MarkRefused,
	}
}

// Attachment is one program attachment of a pod.
type Attachment struct {
	Pin      string `json:"pin"`
	Program  string `json:"program"`
	Hook     string `json:"hook"`
	Attached bool   `json:"attached"`
	// LinkID is the BPF link (tcx and cgroup attachments).
	LinkID uint32 `json:"link_id,omitempty"`
	// ProgramID is the program running there, as bpftool prog lists it.
	ProgramID uint32 `json:"program_id,omitempty"`
}

// Status is a pod's datapath as read from its pins.
type Status struct {
	UID         string       `json:"uid"`
	Interface   string       `json:"interface"`
	Ifindex     uint32       `json:"ifindex"`
	Netns       netns.ID     `json:"netns"`
	NetnsAlive  bool         `json:"netns_alive"`
	CgroupID    uint64       `json:"cgroup_id,omitempty"`
	Mode        string       `json:"mode"`
	Options     Options      `json:"options"`
	AttachedAt  time.Time    `json:"attached_at"`
	ProgramTag  string       `json:"program_tag"`
	Current     bool         `json:"current"`
	PinDir      string       `json:"pin_dir"`
	Attachments []Attachment `json:"attachments"`
	Counters    Counters     `json:"counters"`
}

// Attached is true when every program of the pod is attached.
func (s Status) Attached() bool { return s.missing() == "" }

func (s Status) missing() string {
	var m []string
	for _, a := range s.Attachments {
		if !a.Attached {
			m = append(m, a.Hook)
		}
	}
	return strings.Join(m, ", ")
}

func (l *Loader) status(uid string) (Status, error) {
	dir := l.PodDir(uid)
	info, err := readMeta(dir)
	if err != nil {
		return Status{}, fmt.Errorf("status %s: %w", uid, notAttached(err))
	}
	st := Status{
		UID:        uid,
		Interface:  cString(info.Ifname[:]),
		Ifindex:    info.Ifindex,
		Netns:      netns.ID{Dev: info.NetnsDev, Ino: info.NetnsIno},
		CgroupID:   info.CgroupId,
		Mode:       Mode(info.Mode).String(),
		AttachedAt: time.Unix(0, int64(info.AttachedUnixNs)),
		ProgramTag: hex.EncodeToString(info.ProgramTag[:]),
		Current:    info.ProgramTag == l.tag,
		PinDir:     dir,
	}
	var cfg captureConfig
	if err := lookupPinned(dir, captureMapPodConfig, &cfg); err != nil {
		return Status{}, fmt.Errorf("status %s: %w", uid, err)
	}
	st.Options = optionsFromFlags(cfg.Flags)
	var c captureCounters
	if err := lookupPinned(dir, captureMapPodCounters, &c); err != nil {
		return Status{}, fmt.Errorf("status %s: %w", uid, err)
	}
	st.Counters = countersFrom(c)

	switch Mode(info.Mode) {
	case ModeTCX:
		alive := false
		for _, a := range []struct{ pin, prog, hook string }{
			{pinLinkIngress, captureProgCaptureIngress, "tcx ingress " + st.Interface},
			{pinLinkEgress, captureProgCaptureEgress, "tcx egress " + st.Interface},
			{pinLinkLoEgress, captureProgDnsReply, "tcx egress lo"},
		} {
			at := Attachment{Pin: a.pin, Program: a.prog, Hook: a.hook}
			at.LinkID, at.ProgramID, at.Attached = linkState(filepath.Join(dir, a.pin), func(i *link.Info) bool {
				t := i.TCX()
				return t != nil && t.Ifindex != 0
			})
			alive = alive || at.Attached
			st.Attachments = append(st.Attachments, at)
		}
		// A tcx link detaches when its device goes, and a pod's devices go
		// with its netns: no attached link means no netns.
		st.NetnsAlive = alive
	case ModeClsact:
		var present map[string]uint32
		ns, err := findNetns(st.Netns)
		if err == nil {
			st.NetnsAlive = true
			err = ns.Do(func() error {
				var e error
				present, e = clsactAttached(&info)
				return e
			})
			ns.Close()
		}
		if err != nil && !errors.Is(err, errNetnsGone) {
			return Status{}, fmt.Errorf("status %s: %w", uid, err)
		}
		for _, s := range clsactSlots(int(info.Ifindex), nil) {
			hook := "clsact ingress " + st.Interface
			switch s.name {
			case "ambpf_" + captureProgCaptureEgress:
				hook = "clsact egress " + st.Interface
			case "ambpf_" + captureProgDnsReply:
				hook = "clsact egress lo"
			}
			st.Attachments = append(st.Attachments, Attachment{
				Pin: "prog_" + strings.TrimPrefix(s.name, "ambpf_"), Program: strings.TrimPrefix(s.name, "ambpf_"),
				Hook: hook, Attached: present[s.name] != 0, ProgramID: present[s.name],
			})
		}
	}
	if _, err := os.Stat(filepath.Join(dir, pinLinkSockopt)); err == nil {
		at := Attachment{Pin: pinLinkSockopt, Program: captureProgGuardMark, Hook: "cgroup setsockopt"}
		at.LinkID, at.ProgramID, at.Attached = linkState(filepath.Join(dir, pinLinkSockopt), func(i *link.Info) bool {
			c := i.Cgroup()
			return c != nil && c.CgroupId != 0
		})
		st.Attachments = append(st.Attachments, at)
	}
	sort.SliceStable(st.Attachments, func(i, j int) bool { return st.Attachments[i].Pin < st.Attachments[j].Pin })
	return st, nil
}

func lookupPinned(dir, name string, out any) error {
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
	if err != nil {
		return fmt.Errorf("open %s: %w", name, err)
	}
	defer m.Close()
	if err := m.Lookup(uint32(0), out); err != nil {
		return fmt.Errorf("read %s: %w", name, err)
	}
	return nil
}

func linkState(path string, attached func(*link.Info) bool) (linkID, progID uint32, ok bool) {
	lk, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		return 0, 0, false
	}
	defer lk.Close()
	info, err := lk.Info()
	if err != nil {
		return 0, 0, false
	}
	return uint32(info.ID), uint32(info.Program), attached(info)
}
