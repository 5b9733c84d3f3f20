//go:build linux

package kubee2e

import (
	"bytes"
	"strings"
	"testing"

	"github.com/ambpf/ambpf/pkg/podwatch"
)

const marker = "plaintext-marker-7f3a"

// expectHBONE checks that every packet between a and b on the wire went
// to or from port 15008 and that the app data never crossed it in clear.
func expectHBONE(t *testing.T, raw []byte, lines []string) {
	t.Helper()
	if len(lines) == 0 {
		t.Fatal("no packet between the pods crossed the wire")
	}
	for _, l := range lines {
		if !strings.Contains(l, ".15008 ") && !strings.Contains(l, ".15008:") {
			t.Errorf("packet not to or from 15008: %s", l)
		}
	}
	if bytes.Contains(raw, []byte(marker)) || bytes.Contains(raw, []byte("app ")) {
		t.Errorf("the app's data crossed the wire in clear text")
	}
}

// expectPlain checks that the pods talked directly: packets on the wire,
// none to or from 15008, and the app's greeting in clear.
func expectPlain(t *testing.T, raw []byte, lines []string, greeting string) {
	t.Helper()
	if len(lines) == 0 {
		t.Fatal("no packet between the pods crossed the wire")
	}
	for _, l := range lines {
		if strings.Contains(l, ".15008") {
			t.Errorf("HBONE between pods that are not enrolled: %s", l)
		}
	}
	if !bytes.Contains(raw, []byte(greeting)) {
		t.Errorf("the app's greeting %q was not seen in clear text on the wire:\n%s", greeting, strings.Join(lines, "\n"))
	}
}

// TestEnrolment: a labelled namespace's pods are enrolled through CNI and
// talk HBONE with the real peer IP seen; the exclusions (pod label none,
// hostNetwork, kube-system) are not enrolled and talk directly; removing
// the namespace label removes the annotation and the capture, and adding
// it back enrols the running pods through the /proc search.
func TestEnrolment(t *testing.T) {
	c := newCluster(t)
	mesh := c.namespace("mesh", map[string]string{podwatch.DataplaneModeLabel: podwatch.DataplaneAmbient})
	a := c.startPod(mesh, "a", podOpts{})
	b := c.startPod(mesh, "b", podOpts{})
	for _, p := range []*kpod{a, b} {
		c.waitAnnotation(p, podwatch.RedirectionEnabled)
		if ok, path := c.enrolled(p); !ok || path != p.netns.NSPath {
			t.Fatalf("%s: enrolled=%t netns=%q, want the CNI netns %s", p, ok, path, p.netns.NSPath)
		}
	}

	cap := c.capture()
	tc := mustDial(t, a, b)
	echo(t, tc, marker)
	tc.Conn.Close()
	raw, lines := cap.stop(a, b, "")
	expectHBONE(t, raw, lines)

	// Exclusions.
	none := c.startPod(mesh, "opted-out", podOpts{labels: map[string]string{podwatch.DataplaneModeLabel: podwatch.DataplaneNone}})
	c.namespace("kube-system", nil)
	sys := c.startPod("kube-system", "sys-"+c.id, podOpts{labels: map[string]string{podwatch.DataplaneModeLabel: podwatch.DataplaneAmbient}})
	host := c.startPod(mesh, "host", podOpts{hostNetwork: true})
	for _, p := range []*kpod{none, sys, host} {
		if ok, _ := c.enrolled(p); ok {
			t.Errorf("%s is enrolled", p)
		}
		if v := c.annotation(p); v != "" {
			t.Errorf("%s annotated %q", p, v)
		}
	}
	cap = c.capture()
	tc = mustDial(t, none, sys)
	echo(t, tc, marker)
	tc.Conn.Close()
	raw, lines = cap.stop(none, sys, tc.Greeting)
	expectPlain(t, raw, lines, tc.Greeting)
	// The node (a hostNetwork pod) reaches the opted-out pod directly.
	tc = mustDial(t, host, none)
	echo(t, tc, marker)

	// Label removed: the pods leave the mesh.
	c.setNamespaceLabel(mesh, "")
	for _, p := range []*kpod{a, b} {
		c.waitAnnotation(p, "")
		if ok, _ := c.enrolled(p); ok {
			t.Fatalf("%s still enrolled after its namespace lost the label", p)
		}
	}
	if pins := c.env.PinnedUIDs(t); len(pins) != 0 {
		t.Errorf("pins left after unenrolment: %v", pins)
	}
	cap = c.capture()
	tc = mustDial(t, a, b)
	echo(t, tc, marker)
	tc.Conn.Close()
	raw, lines = cap.stop(a, b, tc.Greeting)
	expectPlain(t, raw, lines, tc.Greeting)

	// Label added to the running pods' namespace: no CNI event, the
	// agent finds their netns through /proc.
	c.setNamespaceLabel(mesh, podwatch.DataplaneAmbient)
	for _, p := range []*kpod{a, b} {
		c.waitAnnotation(p, podwatch.RedirectionEnabled)
		if ok, path := c.enrolled(p); !ok || !strings.HasPrefix(path, "/proc/") {
			t.Fatalf("%s: enrolled=%t netns=%q, want a /proc path", p, ok, path)
		}
	}
	if ok, _ := c.enrolled(none); ok {
		t.Errorf("%s enrolled by its namespace's label", none)
	}
	cap = c.capture()
	tc = mustDial(t, a, b)
	echo(t, tc, marker)
	tc.Conn.Close()
	raw, lines = cap.stop(a, b, "")
	expectHBONE(t, raw, lines)
}
