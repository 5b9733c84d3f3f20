//go:build linux

package nettest

import (
	"context"
	"os"
	"strings"
	"testing"
)

// TestScenariosIPTables runs the whole table against the reference rules.
func TestScenariosIPTables(t *testing.T) {
	Run(t, IPTables{})
}

// TestScenariosNoCapture shows that the table can fail: without capture,
// traffic goes straight to the apps.
func TestScenariosNoCapture(t *testing.T) {
	want := map[string]Result{
		"01-inbound-app-port/v4": direct("app@A", "R"),
		"03-outbound/v6":         direct("app@R", "A"),
		"08-dns-udp-captured/v4": udpDirect("udp@R", "A", "R:53"),
		"12-no-proxy-inbound/v6": direct("app@A", "R"),
	}
	var names []string
	for n := range want {
		names = append(names, n)
	}
	got := Collect(t, NoCapture{}, names...)
	byName := map[string]Scenario{}
	for _, s := range Scenarios() {
		byName[s.Name] = s
	}
	for n, w := range want {
		r, ok := got[n]
		if !ok {
			t.Errorf("%s: not run", n)
			continue
		}
		if r.comparable() != w {
			t.Errorf("%s without capture:\n got  %v\n want %v", n, r, w)
		}
		if byName[n].Expect(r) == nil {
			t.Errorf("%s: expectation met without any capture; the scenario checks nothing", n)
		}
	}
	if d := Diff(got, Collect(t, IPTables{}, names...)); len(d) != len(want) {
		t.Errorf("Diff(none, iptables) = %d lines, want %d:\n%s", len(d), len(want), strings.Join(d, "\n"))
	}
}

// TestIPTablesEnrollIdempotent checks that re-enrolling replaces the rules
// in place and Unenroll removes everything.
func TestIPTablesEnrollIdempotent(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	p := NewTopology(t, 1).Pod(0)
	ctx := context.Background()
	dump := func() string {
		var b strings.Builder
		for _, args := range [][]string{
			{"iptables-save"}, {"ip6tables-save"},
			{"ip", "-4", "rule"}, {"ip", "-6", "rule"},
			{"ip", "-4", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"},
		} {
			out, err := p.Exec(ctx, args[0], args[1:]...)
			if err != nil {
				t.Fatal(err)
			}
			for _, l := range strings.Split(string(out), "\n") {
				if !strings.HasPrefix(l, "#") { // skip save timestamps
					b.WriteString(l + "\n")
				}
			}
		}
		return b.String()
	}
	clean := dump()
	c := IPTables{}
	if err := c.Enroll(p, CaptureOptions{DNS: true}); err != nil {
		t.Fatal(err)
	}
	withDNS := dump()
	for _, want := range []string{"--to-ports 15053", "CT --zone 1", "fwmark 0x111/0xfff lookup 100", "local default dev lo"} {
		if !strings.Contains(withDNS, want) {
			t.Errorf("enrolled state lacks %q:\n%s", want, withDNS)
		}
	}
	if err := c.Enroll(p, CaptureOptions{DNS: true}); err != nil {
		t.Fatal(err)
	}
	if again := dump(); again != withDNS {
		t.Errorf("re-enroll changed the rules:\nbefore\n%s\nafter\n%s", withDNS, again)
	}
	if err := c.Enroll(p, CaptureOptions{}); err != nil {
		t.Fatal(err)
	}
	if s := dump(); strings.Contains(s, "15053") || strings.Contains(s, "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO") {
		t.Errorf("re-enroll without DNS left DNS rules:\n%s", s)
	}
	if err := c.Unenroll(p); err != nil {
		t.Fatal(err)
	}
	if s := dump(); strings.Contains(s, "ISTIO") || strings.Contains(s, "0x111") || strings.Contains(s, "local default") {
		t.Errorf("unenroll left state behind (clean state was):\n%s\nnow:\n%s", clean, s)
	}
	if err := c.Unenroll(p); err != nil {
		t.Errorf("second unenroll: %v", err)
	}
}
