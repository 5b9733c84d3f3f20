// Package dpstate is the plain data the eBPF datapath reports about a pod:
// its options, attachments, counters and status, as pkg/datapath reads
// them from the pins and the agent's API carries them. It holds no BPF
// code, so clients of the API (the CNI plugin) do not link the loader.
package dpstate

import (
	"strings"
	"time"

	"github.com/ambpf/ambpf/pkg/netns"
)

// Options are the per-pod switches, Istio's pod annotations.
type Options struct {
	// DNSCapture sends the pod's DNS (UDP and TCP port 53) to the proxy's
	// resolver on 15053.
	DNSCapture bool
	// BypassInbound leaves inbound connections uncaptured.
	BypassInbound bool
}

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
	DroppedUnparsed   uint64 `json:"dropped_unparsed"`
	DirectFull        uint64 `json:"direct_full"`
	MarkUntrusted     uint64 `json:"mark_untrusted"`
	// DirectEntries is not a counter but a gauge: the pod's entries in
	// the node's direct_flows now (its share is datapath.MapSizes.DirectFlowsPerPod).
	DirectEntries int64 `json:"direct_entries"`
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
	UID string `json:"uid"`
	// Index is the pod's key in the node-wide maps (bpftool map lookup
	// pinned <root>/node/pod_counters key <index as 4 bytes>).
	Index       uint32       `json:"index"`
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
func (s Status) Attached() bool { return s.Missing() == "" }

// Missing names the hooks whose program is not attached, comma-separated.
func (s Status) Missing() string {
	var m []string
	for _, a := range s.Attachments {
		if !a.Attached {
			m = append(m, a.Hook)
		}
	}
	return strings.Join(m, ", ")
}

// DefaultRoot is the bpffs directory holding the datapath's pins
// (datapath.DefaultRoot), here so that clients name it without linking
// the loader.
const DefaultRoot = "/sys/fs/bpf/ambpf"
