package podwatch

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

// EnablementSelector is one entry of Istio's ambient.enablementSelectors
// (istio-cni's AMBIENT_ENABLEMENT_SELECTOR): a pod is enrolled when its
// labels match PodSelector and its namespace's match NamespaceSelector;
// a nil selector matches everything.
type EnablementSelector struct {
	PodSelector       *metav1.LabelSelector `json:"podSelector,omitempty"`
	NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
}

// DefaultEnablementSelectors is the YAML of istio-cni's default
// (manifests/charts/istio-cni/values.yaml): pods labelled
// istio.io/dataplane-mode=ambient, and pods of a namespace labelled so
// whose own label is not "none".
const DefaultEnablementSelectors = `
- podSelector:
    matchLabels: {istio.io/dataplane-mode: ambient}
- podSelector:
    matchExpressions:
    - {key: istio.io/dataplane-mode, operator: NotIn, values: [none]}
  namespaceSelector:
    matchLabels: {istio.io/dataplane-mode: ambient}
`

// Enablement is a compiled list of enablement selectors.
type Enablement []compiledSelector

type compiledSelector struct {
	pod, ns labels.Selector // nil: everything
}

// ParseEnablement compiles a YAML (or JSON) list of EnablementSelector;
// "" is DefaultEnablementSelectors.
func ParseEnablement(doc string) (Enablement, error) {
	if doc == "" {
		doc = DefaultEnablementSelectors
	}
	var specs []EnablementSelector
	if err := yaml.UnmarshalStrict([]byte(doc), &specs); err != nil {
		return nil, fmt.Errorf("enablement selectors: %w", err)
	}
	out := make(Enablement, 0, len(specs))
	for i, s := range specs {
		var c compiledSelector
		var err error
		if s.PodSelector != nil {
			if c.pod, err = metav1.LabelSelectorAsSelector(s.PodSelector); err != nil {
				return nil, fmt.Errorf("enablement selector %d: podSelector: %w", i, err)
			}
		}
		if s.NamespaceSelector != nil {
			if c.ns, err = metav1.LabelSelectorAsSelector(s.NamespaceSelector); err != nil {
				return nil, fmt.Errorf("enablement selector %d: namespaceSelector: %w", i, err)
			}
		}
		out = append(out, c)
	}
	return out, nil
}

// matches reports whether pod (in ns, nil when unknown: a namespace
// selector then does not match) is selected by one of e.
func (e Enablement) matches(pod *corev1.Pod, ns *corev1.Namespace) bool {
	for _, c := range e {
		if c.pod != nil && !c.pod.Matches(labels.Set(pod.Labels)) {
			continue
		}
		if c.ns != nil && (ns == nil || !c.ns.Matches(labels.Set(ns.Labels))) {
			continue
		}
		return true
	}
	return false
}
