//go:build linux

// Package agentapi is the node agent's enrolment API: HTTP with JSON bodies
// over a unix socket (default DefaultSocket). It holds the wire types, their
// validation, and a Client; the agent serves it, the CNI plugin and ambpfctl
// call it.
//
// Endpoints:
//
//	POST   /v1/pods        EnrollRequest -> PodState (201 new, 200 already enrolled)
//	DELETE /v1/pods/{uid}  -> 204; 404 when the agent knows nothing of uid
//	GET    /v1/pods        -> []PodState
//	GET    /v1/pods/{uid}  -> PodStatus (state + datapath status and counters)
//	GET    /v1/status      -> Status
//
// Every error is an Error body with a matching HTTP status.
package agentapi

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/ambpf/ambpf/pkg/dpstate"
	"github.com/ambpf/ambpf/pkg/netns"
)

// DefaultSocket is where the agent serves the API.
const DefaultSocket = "/var/run/ambpf/agent.sock"

// Enrolment states of a pod.
const (
	// StateEnabled: the datapath is attached and the proxy acked the pod.
	StateEnabled = "enabled"
	// StatePending: the datapath is attached (traffic is captured, and
	// dropped while no proxy listens: fail closed) and the agent keeps
	// retrying to hand the pod to a proxy.
	StatePending = "pending"
)

// Error codes, the machine-readable part of an Error.
const (
	CodeInvalid     = "invalid_request" // a field is missing or malformed (400)
	CodeBadNetns    = "bad_netns"       // the netns path is not an open-able network namespace (400)
	CodeNotFound    = "not_found"       // no such pod (404)
	CodeConflict    = "conflict"        // the UID is enrolled with another netns (409)
	CodeNetnsGone   = "netns_gone"      // the netns vanished during enrolment (410)
	CodeAttach      = "attach_failed"   // the datapath could not be attached (500)
	CodeUnavailable = "unavailable"     // the agent is not ready (503)
	CodeNoProxy     = "no_proxy"        // no proxy took the pod; nothing is left attached (503)
	CodeInternal    = "internal"        // anything else (500)
)

// EnrollRequest asks the agent to enrol a pod: attach the datapath in its
// netns and hand it to the proxy.
type EnrollRequest struct {
	UID            string `json:"uid"`
	Name           string `json:"name"`
	Namespace      string `json:"namespace"`
	ServiceAccount string `json:"service_account"`
	// Netns is the path of the pod's network namespace file
	// (/var/run/netns/x, /proc/<pid>/ns/net).
	Netns string       `json:"netns"`
	IPs   []netip.Addr `json:"ips,omitempty"`
	// Cgroup is the pod's cgroup v2 directory; when set the mark guard is
	// attached to it.
	Cgroup string `json:"cgroup,omitempty"`
	// Interface is the pod's device; eth0 when empty.
	Interface     string `json:"interface,omitempty"`
	DNSCapture    bool   `json:"dns_capture,omitempty"`
	BypassInbound bool   `json:"bypass_inbound,omitempty"`
	// FastPath is the pod's own choice of the in-pod fast path (its
	// ambpf.io/fastpath annotation): FastPathEnabled, FastPathDisabled,
	// or "" for the node's default. It never turns the fast path on in
	// an agent whose --fastpath is off.
	FastPath string `json:"fast_path,omitempty"`
}

// The values of EnrollRequest.FastPath (and of the ambpf.io/fastpath
// annotation) besides "".
const (
	FastPathEnabled  = "enabled"
	FastPathDisabled = "disabled"
)

// PodState is what the agent records for an enrolled pod.
type PodState struct {
	EnrollRequest
	// NetnsID identifies the netns the pod was enrolled with, so a path
	// reused by another namespace is never mistaken for the pod's.
	NetnsID netns.ID `json:"netns_id"`
	// State is StateEnabled or StatePending.
	State string `json:"state"`
	// Reason says why a pod is pending (the last proxy error).
	Reason     string    `json:"reason,omitempty"`
	EnrolledAt time.Time `json:"enrolled_at"`
}

// PodStatus is one pod in detail: its state and its datapath as the pins
// show it.
type PodStatus struct {
	PodState
	Datapath *dpstate.Status `json:"datapath,omitempty"`
	// DatapathError says why Datapath could not be read.
	DatapathError string `json:"datapath_error,omitempty"`
	// FastPath is the pod's in-pod fast path; nil when the agent runs
	// without it (--fastpath off).
	FastPath *dpstate.FastPath `json:"fast_path,omitempty"`
}

// Status is the agent as a whole.
type Status struct {
	// Ready: the state is reconciled with the pins and the ZDS server
	// listens.
	Ready    bool        `json:"ready"`
	Features Features    `json:"features"`
	Proxy    ProxyStatus `json:"proxy"`
	Pods     PodCounts   `json:"pods"`
	BPFRoot  string      `json:"bpf_root"`
	ZDSPath  string      `json:"zds_path"`
	// Memory is the kernel memory the datapath's BPF objects hold; nil
	// when it could not be read.
	Memory *Memory `json:"memory,omitempty"`
}

// Memory is the kernel memory of the datapath's BPF maps and programs,
// as the kernel accounts it (memlock).
type Memory struct {
	// NodeBytes is the node's shared programs and maps.
	NodeBytes uint64 `json:"node_bytes"`
	// PodsBytes is every pod's own entry programs, summed.
	PodsBytes uint64 `json:"pods_bytes"`
	// Enrolled is the pods counted; PerPodBytes is the total over them.
	Enrolled    int    `json:"enrolled"`
	PerPodBytes uint64 `json:"per_pod_bytes"`
}

// Features are the kernel mechanisms the datapath chose.
type Features struct {
	Kernel          string `json:"kernel"`
	Mode            string `json:"mode"`
	ReusePortAssign bool   `json:"reuseport_assign"`
	// ReusePortProbeError is why the SO_REUSEPORT steering probe could
	// not answer (ReusePortAssign is then false); empty when it did.
	ReusePortProbeError string `json:"reuseport_probe_error,omitempty"`
}

// ProxyStatus counts the ZDS connections.
type ProxyStatus struct {
	// Connections is the proxies connected; Synced of them acked a whole
	// snapshot.
	Connections int `json:"connections"`
	Synced      int `json:"synced"`
	// Cgroups are the cgroups whose sockets the datapath takes as the
	// proxy's (those of the processes that connected over ZDS).
	Cgroups []ProxyCgroup `json:"cgroups,omitempty"`
}

// ProxyCgroup is one trusted proxy cgroup.
type ProxyCgroup struct {
	ID  uint64 `json:"id"`
	PID uint32 `json:"pid"`
}

// PodCounts counts the enrolled pods by state.
type PodCounts struct {
	Total   int `json:"total"`
	Enabled int `json:"enabled"`
	Pending int `json:"pending"`
}

// Error is the body of every error answer.
type Error struct {
	Message string `json:"error"`
	Code    string `json:"code"`
	// HTTPStatus is the answer's status code; not on the wire.
	HTTPStatus int `json:"-"`
}

func (e *Error) Error() string { return e.Message }

// IsNotFound reports whether err is the agent saying it has no such pod.
func IsNotFound(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Code == CodeNotFound
}

var (
	// The datapath's pin-directory rule (Kubernetes UIDs fit it).
	uidPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`)
	// DNS-1123 subdomain (pod names, service accounts) and label
	// (namespaces), as Kubernetes validates them.
	subdomainPattern = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)
	labelPattern     = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
)

// ValidateUID checks a pod UID: letters, digits, '-' and '_', at most 63,
// not starting with a separator.
func ValidateUID(uid string) error {
	if uid == "" {
		return errors.New("uid is required")
	}
	if !uidPattern.MatchString(uid) {
		return fmt.Errorf("uid %q is invalid: use 1-63 letters, digits, '-' or '_', starting with a letter or digit", uid)
	}
	return nil
}

// Validate checks every field of r and returns all problems in one error. It
// does not touch the system: the agent checks that the netns and cgroup
// really are what they claim.
func (r *EnrollRequest) Validate() error {
	var errs []error
	if err := ValidateUID(r.UID); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs,
		validateName("name", r.Name, 253, subdomainPattern),
		validateName("namespace", r.Namespace, 63, labelPattern),
		validateName("service_account", r.ServiceAccount, 253, subdomainPattern),
		validatePath("netns", r.Netns, true),
		validatePath("cgroup", r.Cgroup, false),
	)
	if r.FastPath != "" && r.FastPath != FastPathEnabled && r.FastPath != FastPathDisabled {
		errs = append(errs, fmt.Errorf("fast_path %q: want %s, %s or empty (the node's default)", r.FastPath, FastPathEnabled, FastPathDisabled))
	}
	for i, ip := range r.IPs {
		if !ip.IsValid() {
			errs = append(errs, fmt.Errorf("ips[%d] is not an IP address", i))
		}
	}
	if r.Interface != "" {
		if len(r.Interface) > 15 || strings.ContainsAny(r.Interface, "/: \t\n") || r.Interface == "." || r.Interface == ".." {
			errs = append(errs, fmt.Errorf("interface %q is not a valid device name (at most 15 characters, no '/', ':' or spaces)", r.Interface))
		}
	}
	return joinProblems(errs)
}

// joinProblems joins the non-nil errors on one line, for an error body a
// human reads.
func joinProblems(errs []error) error {
	var msgs []string
	for _, e := range errs {
		if e != nil {
			msgs = append(msgs, e.Error())
		}
	}
	if len(msgs) == 0 {
		return nil
	}
	return errors.New(strings.Join(msgs, "; "))
}

func validateName(field, v string, max int, pattern *regexp.Regexp) error {
	switch {
	case v == "":
		return fmt.Errorf("%s is required", field)
	case len(v) > max:
		return fmt.Errorf("%s is longer than %d characters", field, max)
	case !pattern.MatchString(v):
		return fmt.Errorf("%s %q is invalid: lowercase letters, digits and '-' (and '.' between parts) only", field, v)
	}
	return nil
}

func validatePath(field, v string, required bool) error {
	switch {
	case v == "" && required:
		return fmt.Errorf("%s is required", field)
	case v == "":
		return nil
	case !filepath.IsAbs(v):
		return fmt.Errorf("%s %q must be an absolute path", field, v)
	case len(v) > 4096:
		return fmt.Errorf("%s is longer than 4096 characters", field)
	}
	return nil
}
