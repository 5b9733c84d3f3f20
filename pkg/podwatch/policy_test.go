package podwatch

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/ambpf/ambpf/pkg/agentapi"
)

func TestPolicyWants(t *testing.T) {
	sel, err := labels.Parse("app.kubernetes.io/name=ambpf,app.kubernetes.io/component in (agent,proxy)")
	if err != nil {
		t.Fatal(err)
	}
	pol := Policy{ExcludedNamespaces: []string{"kube-system"}, Exclude: sel, Self: "ambpf/agent-x"}
	ambient := map[string]string{DataplaneModeLabel: DataplaneAmbient}
	nsMesh := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "mesh", Labels: ambient}}
	nsPlain := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "plain"}}
	pod := func(ns string, lbl, ann map[string]string, host bool) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: ns, Labels: lbl, Annotations: ann},
			Spec: corev1.PodSpec{HostNetwork: host}}
	}
	for _, tc := range []struct {
		name string
		pod  *corev1.Pod
		ns   *corev1.Namespace
		want bool
	}{
		{"namespace label", pod("mesh", nil, nil, false), nsMesh, true},
		{"pod label", pod("plain", ambient, nil, false), nsPlain, true},
		{"pod label, namespace unknown", pod("plain", ambient, nil, false), nil, true},
		{"no label", pod("plain", nil, nil, false), nsPlain, false},
		{"pod none wins", pod("mesh", map[string]string{DataplaneModeLabel: DataplaneNone}, nil, false), nsMesh, false},
		{"other pod value follows namespace", pod("mesh", map[string]string{DataplaneModeLabel: "sidecar"}, nil, false), nsMesh, true},
		{"host network", pod("mesh", ambient, nil, true), nsMesh, false},
		{"sidecar injected", pod("mesh", nil, map[string]string{SidecarStatusAnnotation: "{}"}, false), nsMesh, false},
		// istio-cni checks the annotation's presence only.
		{"sidecar status empty", pod("mesh", nil, map[string]string{SidecarStatusAnnotation: ""}, false), nsMesh, false},
		{"excluded namespace", pod("kube-system", ambient, nil, false), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "kube-system", Labels: ambient}}, false},
		{"mesh's own pod", pod("mesh", map[string]string{"app.kubernetes.io/name": "ambpf", "app.kubernetes.io/component": "proxy"}, nil, false), nsMesh, false},
		{"same name, other component", pod("mesh", map[string]string{"app.kubernetes.io/name": "ambpf", "app.kubernetes.io/component": "web"}, nil, false), nsMesh, true},
		{"agent itself", &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "agent-x", Namespace: "ambpf", Labels: ambient}}, nil, false},
	} {
		got, reason := pol.Wants(tc.pod, tc.ns)
		if got != tc.want {
			t.Errorf("%s: Wants = %t (%s), want %t", tc.name, got, reason, tc.want)
		}
		if !got && reason == "" {
			t.Errorf("%s: no reason given", tc.name)
		}
	}
}

func TestPolicyOptions(t *testing.T) {
	for _, tc := range []struct {
		global      bool
		ann         map[string]string
		dns, bypass bool
	}{
		{false, nil, false, false},
		{true, nil, true, false},
		{true, map[string]string{DNSCaptureAnnotation: "false"}, false, false},
		{false, map[string]string{DNSCaptureAnnotation: "true", BypassInboundAnnotation: "true"}, true, true},
		// ParseBool semantics, as istio-cni's CheckBooleanAnnotation;
		// a value it refuses is ignored.
		{false, map[string]string{DNSCaptureAnnotation: "yes", BypassInboundAnnotation: "1"}, false, true},
		{true, map[string]string{DNSCaptureAnnotation: "0", BypassInboundAnnotation: "TRUE"}, false, true},
		{false, map[string]string{DNSCaptureAnnotation: "t", BypassInboundAnnotation: "F"}, true, false},
		{true, map[string]string{DNSCaptureAnnotation: "on"}, true, false},
	} {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Annotations: tc.ann}}
		dns, bypass := Policy{DNSCapture: tc.global}.Options(p)
		if dns != tc.dns || bypass != tc.bypass {
			t.Errorf("global=%t %v: dns=%t bypass=%t, want %t %t", tc.global, tc.ann, dns, bypass, tc.dns, tc.bypass)
		}
	}
	if sa := ServiceAccount(&corev1.Pod{}); sa != DefaultServiceAccount {
		t.Errorf("ServiceAccount of a pod naming none = %q", sa)
	}
}

// TestPolicyFastPath: the ambpf.io/fastpath annotation passes enabled and
// disabled to the enrolment; anything else (other spellings included)
// means the node's default, as if absent.
func TestPolicyFastPath(t *testing.T) {
	for ann, want := range map[string]string{
		"enabled": agentapi.FastPathEnabled, "disabled": agentapi.FastPathDisabled,
		"": "", "Enabled": "", "true": "", "off": "", "both": "",
	} {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Annotations: map[string]string{FastPathAnnotation: ann}}}
		if got := (Policy{}).FastPath(p); got != want {
			t.Errorf("%s: %q: %q, want %q", FastPathAnnotation, ann, got, want)
		}
	}
	if got := (Policy{}).FastPath(&corev1.Pod{}); got != "" {
		t.Errorf("no annotation: %q, want the node's default", got)
	}
	req := agentapi.EnrollRequest{UID: "u", Name: "n", Namespace: "ns", ServiceAccount: "sa", Netns: "/run/netns/x", FastPath: "on"}
	if err := req.Validate(); err == nil || !strings.Contains(err.Error(), "fast_path") {
		t.Errorf("an enrolment with fast_path %q: %v, want refused", req.FastPath, err)
	}
}

// TestEnablementSelectors: the enrolment selectors are configurable as
// istio-cni's ambient.enablementSelectors, and the default behaves as
// Istio's default.
func TestEnablementSelectors(t *testing.T) {
	custom, err := ParseEnablement(`
- podSelector: {matchLabels: {mesh: "yes"}}
  namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [a, b]}]}
`)
	if err != nil {
		t.Fatal(err)
	}
	ns := func(l map[string]string) *corev1.Namespace {
		return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "n", Labels: l}}
	}
	pod := func(l map[string]string) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "n", Labels: l}}
	}
	ambient := map[string]string{DataplaneModeLabel: DataplaneAmbient}
	for _, tc := range []struct {
		name string
		sel  Enablement
		pod  map[string]string
		ns   map[string]string
		want bool
	}{
		{"custom: both match", custom, map[string]string{"mesh": "yes"}, map[string]string{"team": "a"}, true},
		{"custom: namespace misses", custom, map[string]string{"mesh": "yes"}, map[string]string{"team": "c"}, false},
		{"custom: the Istio label no longer enrols", custom, ambient, ambient, false},
		{"default: namespace label", nil, nil, ambient, true},
		{"default: pod none", nil, map[string]string{DataplaneModeLabel: DataplaneNone}, ambient, false},
	} {
		got, reason := Policy{Enablement: tc.sel}.Wants(pod(tc.pod), ns(tc.ns))
		if got != tc.want {
			t.Errorf("%s: Wants = %t (%s), want %t", tc.name, got, reason, tc.want)
		}
	}
	if _, err := ParseEnablement("- podSelector: {matchLabel: {a: b}}"); err == nil {
		t.Error("a misspelt field was accepted")
	}
}
