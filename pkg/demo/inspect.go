//go:build linux

package demo

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"time"

	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/netlab"
)

// inspect prints the datapath's view: mode, counters, the pinned counter
// map through bpftool, and the absence of any iptables/nft rule in app-a.
func (d *demo) inspect(ctx context.Context) error {
	d.printf("  datapath: %s\n", d.loader.Features())
	var dirA string
	for _, name := range enrolled {
		st, err := d.loader.Get(name)
		if err != nil {
			return err
		}
		if name == podA {
			dirA = st.PinDir
			c := st.Counters
			d.check(c.CapturedOut > 0 && c.CapturedIn > 0 && c.CapturedDNS > 0,
				"app-a counters show no captured outbound, inbound or DNS traffic")
			d.check(c.DroppedNoListener > 0, "app-a counters show no fail-closed drop")
		}
		d.printf("  %s counters: %s\n", name, formatCounters(st.Counters))
	}

	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	pin := filepath.Join(dirA, "pod_counters")
	d.printf("\n  $ bpftool map dump pinned %s\n", pin)
	if out, err := tool(ctx, nil, "bpftool", "map", "dump", "pinned", pin); err != nil {
		d.printf("    %v\n", err)
		d.check(false, "bpftool map dump")
	} else {
		d.printIndented(out)
	}

	a := d.lab.PodNamed(podA)
	d.printf("\n  rules inside app-a (%s):\n", a.NSName)
	for _, cmd := range [][]string{{"iptables-save"}, {"ip6tables-save"}, {"nft", "list", "ruleset"}} {
		d.printf("  $ %s\n", strings.Join(cmd, " "))
		out, err := tool(ctx, &a.Netns, cmd[0], cmd[1:]...)
		if err != nil {
			d.printf("    %v\n", err)
			d.check(false, strings.Join(cmd, " ")+" in app-a")
			continue
		}
		if rules := ruleLines(out); len(rules) > 0 {
			d.printIndented(out)
			d.check(false, fmt.Sprintf("%s in app-a shows rules: %s", cmd[0], strings.Join(rules, "; ")))
			continue
		}
		d.printf("    (no rules)\n")
	}
	// What the datapath does install besides its programs: Istio's policy
	// rule and local route, with netlink.
	for _, cmd := range [][]string{{"ip", "rule", "show", "table", "100"}, {"ip", "route", "show", "table", "100"}} {
		d.printf("  $ %s\n", strings.Join(cmd, " "))
		out, err := tool(ctx, &a.Netns, cmd[0], cmd[1:]...)
		if err != nil {
			d.printf("    %v\n", err)
			continue
		}
		d.printIndented(out)
	}
	return nil
}

// tool runs a command, inside n when given; a missing binary says how to
// get it.
func tool(ctx context.Context, n *netlab.Netns, name string, args ...string) (string, error) {
	if _, err := exec.LookPath(name); err != nil {
		return "", fmt.Errorf("%s not installed (make deps installs it): %w", name, err)
	}
	var (
		out []byte
		err error
	)
	if n != nil {
		out, err = n.Exec(ctx, name, args...)
	} else {
		out, err = netlab.Run(exec.CommandContext(ctx, name, args...))
	}
	return string(out), err
}

// ruleLines returns the lines of iptables-save or nft output that are
// rules or chains rather than comments, table headers or COMMIT.
func ruleLines(out string) []string {
	var rules []string
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "", strings.HasPrefix(line, "#"), line == "COMMIT", line == "}",
			strings.HasPrefix(line, "*"), strings.HasPrefix(line, "table "):
			continue
		case strings.HasPrefix(line, ":") && strings.HasSuffix(line, "[0:0]") && !strings.HasPrefix(line, ":ISTIO"):
			// A built-in chain's policy line: iptables-save prints
			// these for any table it lists.
			continue
		}
		rules = append(rules, line)
	}
	return rules
}

func (d *demo) printIndented(out string) {
	out = strings.TrimRight(out, "\n")
	if out == "" {
		d.printf("    (empty)\n")
		return
	}
	for _, line := range strings.Split(out, "\n") {
		d.printf("    %s\n", line)
	}
}

// counterField is one named counter.
type counterField struct {
	name  string
	value uint64
}

// counterFields lists every counter in the struct's order, with the JSON
// names bpftool and ambpfctl use, so a counter added to datapath.Counters
// shows up here without a change.
func counterFields(c datapath.Counters) []counterField {
	v := reflect.ValueOf(c)
	out := make([]counterField, 0, v.NumField())
	for i := range v.NumField() {
		name, _, _ := strings.Cut(v.Type().Field(i).Tag.Get("json"), ",")
		out = append(out, counterField{name, v.Field(i).Uint()})
	}
	return out
}

// formatCounters prints every counter as name=value.
func formatCounters(c datapath.Counters) string {
	var parts []string
	for _, f := range counterFields(c) {
		parts = append(parts, fmt.Sprintf("%s=%d", f.name, f.value))
	}
	return strings.Join(parts, " ")
}

// formatDelta prints the counters that moved from before to after as
// name+n; "" when none did.
func formatDelta(before, after datapath.Counters) string {
	var parts []string
	b := counterFields(before)
	for i, f := range counterFields(after) {
		if f.value != b[i].value {
			parts = append(parts, fmt.Sprintf("%s+%d", f.name, f.value-b[i].value))
		}
	}
	return strings.Join(parts, " ")
}

// counters reads every enrolled pod's counters.
func (d *demo) counters() (map[string]datapath.Counters, error) {
	out := map[string]datapath.Counters{}
	for _, name := range enrolled {
		st, err := d.loader.Get(name)
		if err != nil {
			return nil, err
		}
		out[name] = st.Counters
	}
	return out, nil
}
