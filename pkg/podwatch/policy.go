package podwatch

import (
	"slices"
	"strconv"

	"github.com/ambpf/ambpf/pkg/agentapi"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// Labels and annotations of the Istio ambient contract
// (/work/shared/spec/kubernetes.md).
const (
	// DataplaneModeLabel enrols a pod ("ambient" on the pod or its
	// namespace); "none" on the pod opts it out.
	DataplaneModeLabel = "istio.io/dataplane-mode"
	DataplaneAmbient   = "ambient"
	DataplaneNone      = "none"
	// RedirectionAnnotation is the status the agent writes on the pod:
	// RedirectionEnabled or RedirectionPending, absent when not enrolled.
	RedirectionAnnotation = "ambient.istio.io/redirection"
	RedirectionEnabled    = "enabled"
	RedirectionPending    = "pending"
	// SidecarStatusAnnotation marks a sidecar-injected pod: never
	// enrolled, whatever its value (even empty), as istio-cni checks only
	// its presence (cni/pkg/util/podutil.go podHasSidecar).
	SidecarStatusAnnotation = "sidecar.istio.io/status"
	// BypassInboundAnnotation, true, captures outbound traffic only.
	BypassInboundAnnotation = "ambient.istio.io/bypass-inbound-capture"
	// DNSCaptureAnnotation overrides the node's DNS setting.
	DNSCaptureAnnotation = "ambient.istio.io/dns-capture"
)

// FastPathAnnotation is ambpf's own (not Istio's): a pod's choice of the
// in-pod fast path, agentapi.FastPathEnabled or FastPathDisabled, over the
// node's default (the agent's --fastpath-default). It only chooses among
// what the node runs: with the agent's --fastpath off no pod gets it.
const FastPathAnnotation = "ambpf.io/fastpath"

// DefaultServiceAccount is the service account of a pod that names none.
const DefaultServiceAccount = "default"

// Policy decides which pods are enrolled and with what options.
type Policy struct {
	// ExcludedNamespaces are never enrolled.
	ExcludedNamespaces []string
	// Exclude selects pods never enrolled whatever their labels: the
	// mesh's own (agent and proxy).
	Exclude labels.Selector
	// Self is the agent's own pod, "namespace/name"; never enrolled.
	Self string
	// DNSCapture is the node-wide DNS capture setting, which the pod's
	// annotation overrides.
	DNSCapture bool
	// Enablement selects the pods to enrol, as istio-cni's enablement
	// selectors; nil is Istio's default (see DefaultEnablementSelectors).
	Enablement Enablement
}

// defaultEnablement is DefaultEnablementSelectors compiled.
var defaultEnablement = func() Enablement {
	e, err := ParseEnablement("")
	if err != nil {
		panic(err) // a constant: only a bug here
	}
	return e
}()

// Wants reports whether pod (in namespace ns, nil when unknown) is to be
// enrolled, and if not, why.
func (p Policy) Wants(pod *corev1.Pod, ns *corev1.Namespace) (bool, string) {
	switch {
	case pod.Spec.HostNetwork:
		return false, "host network"
	case hasAnnotation(pod, SidecarStatusAnnotation):
		return false, "sidecar injected"
	case slices.Contains(p.ExcludedNamespaces, pod.Namespace):
		return false, "excluded namespace " + pod.Namespace
	case p.Self != "" && p.Self == pod.Namespace+"/"+pod.Name:
		return false, "the agent's own pod"
	case p.Exclude != nil && !p.Exclude.Empty() && p.Exclude.Matches(labels.Set(pod.Labels)):
		return false, "the mesh's own pod (" + p.Exclude.String() + ")"
	}
	sel := p.Enablement
	if sel == nil {
		sel = defaultEnablement
	}
	if sel.matches(pod, ns) {
		return true, ""
	}
	return false, "no enablement selector matches the pod and its namespace (default: " + DataplaneModeLabel + "=" + DataplaneAmbient + " on either, not " + DataplaneNone + " on the pod)"
}

// Options returns the pod's datapath options from its annotations,
// read as istio-cni reads them (CheckBooleanAnnotation): any value
// strconv.ParseBool accepts ("1", "t", "TRUE", "false", ...); another
// value is ignored, as if absent.
func (p Policy) Options(pod *corev1.Pod) (dnsCapture, bypassInbound bool) {
	dnsCapture = p.DNSCapture
	if v, ok := boolAnnotation(pod, DNSCaptureAnnotation); ok {
		dnsCapture = v
	}
	bypassInbound, _ = boolAnnotation(pod, BypassInboundAnnotation)
	return dnsCapture, bypassInbound
}

// FastPath returns the pod's fast path choice for its enrolment request
// (agentapi.EnrollRequest.FastPath): its FastPathAnnotation when that is
// agentapi.FastPathEnabled or FastPathDisabled, else "" (the node's
// default; another value is ignored, as if absent, as the boolean
// annotations are).
func (p Policy) FastPath(pod *corev1.Pod) string {
	switch v := pod.Annotations[FastPathAnnotation]; v {
	case agentapi.FastPathEnabled, agentapi.FastPathDisabled:
		return v
	}
	return ""
}

// boolAnnotation parses a boolean annotation with ParseBool; false, false
// when it is absent or not a boolean.
func boolAnnotation(pod *corev1.Pod, name string) (bool, bool) {
	raw, ok := pod.Annotations[name]
	if !ok {
		return false, false
	}
	v, err := strconv.ParseBool(raw)
	if err != nil {
		return false, false
	}
	return v, true
}

func hasAnnotation(pod *corev1.Pod, name string) bool {
	_, ok := pod.Annotations[name]
	return ok
}

// ServiceAccount is the pod's service account.
func ServiceAccount(pod *corev1.Pod) string {
	if pod.Spec.ServiceAccountName != "" {
		return pod.Spec.ServiceAccountName
	}
	return DefaultServiceAccount
}

// terminal reports whether the pod's containers have all stopped for good:
// it leaves the mesh as a deleted pod does.
func terminal(pod *corev1.Pod) bool {
	return pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed
}
