package podwatch

import (
	"slices"

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
	// SidecarStatusAnnotation marks a sidecar-injected pod: never enrolled.
	SidecarStatusAnnotation = "sidecar.istio.io/status"
	// BypassInboundAnnotation "true" captures outbound traffic only.
	BypassInboundAnnotation = "ambient.istio.io/bypass-inbound-capture"
	// DNSCaptureAnnotation "true"/"false" overrides the node's DNS setting.
	DNSCaptureAnnotation = "ambient.istio.io/dns-capture"
)

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
}

// Wants reports whether pod (in namespace ns, nil when unknown) is to be
// enrolled, and if not, why.
func (p Policy) Wants(pod *corev1.Pod, ns *corev1.Namespace) (bool, string) {
	switch {
	case pod.Spec.HostNetwork:
		return false, "host network"
	case pod.Annotations[SidecarStatusAnnotation] != "":
		return false, "sidecar injected"
	case slices.Contains(p.ExcludedNamespaces, pod.Namespace):
		return false, "excluded namespace " + pod.Namespace
	case p.Self != "" && p.Self == pod.Namespace+"/"+pod.Name:
		return false, "the agent's own pod"
	case p.Exclude != nil && !p.Exclude.Empty() && p.Exclude.Matches(labels.Set(pod.Labels)):
		return false, "the mesh's own pod (" + p.Exclude.String() + ")"
	}
	switch pod.Labels[DataplaneModeLabel] {
	case DataplaneAmbient:
		return true, ""
	case DataplaneNone:
		return false, "pod label " + DataplaneModeLabel + "=" + DataplaneNone
	}
	if ns != nil && ns.Labels[DataplaneModeLabel] == DataplaneAmbient {
		return true, ""
	}
	return false, "neither the pod nor its namespace is labelled " + DataplaneModeLabel + "=" + DataplaneAmbient
}

// Options returns the pod's datapath options from its annotations.
func (p Policy) Options(pod *corev1.Pod) (dnsCapture, bypassInbound bool) {
	dnsCapture = p.DNSCapture
	switch pod.Annotations[DNSCaptureAnnotation] {
	case "true":
		dnsCapture = true
	case "false":
		dnsCapture = false
	}
	return dnsCapture, pod.Annotations[BypassInboundAnnotation] == "true"
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
