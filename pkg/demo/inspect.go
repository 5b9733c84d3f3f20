//go:build linux

package demo

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os/exec"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/metrics"
	"github.com/ambpf/ambpf/pkg/netlab"
	"github.com/ambpf/ambpf/pkg/nodelab"
	"github.com/ambpf/ambpf/pkg/probesnat"
)

// inspect prints what the parts report: the agent through ambpfctl, the
// datapath and probe SNAT counters from their pins, the proxy's metrics,
// and the absence of any iptables/nft rule in app-a.
func (d *demo) inspect(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for _, n := range []struct {
		node *nodelab.Node
		want string
	}{{d.n1, "2 enrolled, 2 enabled"}, {d.n2, "1 enrolled, 1 enabled"}} {
		d.printf("  $ ambpfctl status   (%s)\n", n.node.Name)
		out, err := n.node.Agentctl(ctx, "status")
		if err != nil {
			return err
		}
		d.printIndented(out)
		d.check(strings.Contains(out, n.want), fmt.Sprintf("ambpfctl status on %s does not show %s", n.node.Name, n.want))
	}

	d.printf("\n  counters (from the pins):\n")
	all, err := d.readCounters()
	if err != nil {
		return err
	}
	for _, k := range slices.Sorted(maps.Keys(all)) {
		d.printf("    %s: %s\n", k, formatCounters(all[k]))
	}
	a := all["datapath "+podA]
	d.check(fieldValue(a, "captured_out") >= 2 && fieldValue(a, "captured_in") >= 1,
		"app-a's datapath counters show no captured outbound and inbound connections")
	d.check(fieldValue(all["datapath "+podB], "hbone_in") >= 1, "app-b's datapath counted no HBONE connection")
	d.check(fieldValue(all["datapath "+podC], "hbone_in") >= 1, "app-c's datapath (node2) counted no HBONE connection")

	for _, n := range d.cluster.Nodes {
		d.printf("\n  %s proxy metrics (%s on %s in the node netns):\n", n.Name, metrics.ConnectionsOpenedName, nodelab.MetricsAddr)
		lines, err := proxyMetrics(ctx, n)
		if err != nil {
			d.printf("    %v\n", err)
			d.check(false, n.Name+" proxy metrics")
			continue
		}
		for _, l := range lines {
			d.printf("    %s\n", l)
		}
		d.check(len(lines) > 0, "the "+n.Name+" proxy's metrics count no connection")
	}

	p := d.podNamed(podA)
	d.printf("\n  rules inside app-a (%s):\n", p.NSName)
	for _, cmd := range [][]string{{"iptables-save"}, {"nft", "list", "ruleset"}} {
		d.printf("  $ %s\n", strings.Join(cmd, " "))
		out, err := tool(ctx, p.Netns, cmd[0], cmd[1:]...)
		if err != nil {
			d.printf("    %v\n", err)
			continue
		}
		if rules := ruleLines(out); len(rules) > 0 {
			d.printIndented(out)
			d.check(false, fmt.Sprintf("%s in app-a shows rules: %s", cmd[0], strings.Join(rules, "; ")))
			continue
		}
		d.printf("    (no rules)\n")
	}
	return nil
}

// metricLabels picks the labels shown of each connection counter.
var metricLine = regexp.MustCompile(`^` + metrics.ConnectionsOpenedName + `\{(.*)\} (\S+)$`)
var metricLabel = regexp.MustCompile(`(\w+)="([^"]*)"`)

// proxyMetrics fetches n's proxy's /metrics from inside the node netns
// and summarises its connection counters, one line per series.
func proxyMetrics(ctx context.Context, n *nodelab.Node) ([]string, error) {
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return n.Dial(ctx, network, addr)
		},
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+nodelab.MetricsAddr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("get metrics: %w", err)
	}
	defer resp.Body.Close()
	var out []string
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 4<<20))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		m := metricLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		labels := map[string]string{}
		for _, kv := range metricLabel.FindAllStringSubmatch(m[1], -1) {
			labels[kv[1]] = kv[2]
		}
		out = append(out, fmt.Sprintf("%s reporter=%s %s -> %s security=%s",
			m[2], labels["reporter"], labels["source_workload"], labels["destination_workload"], labels["connection_security_policy"]))
	}
	return out, sc.Err()
}

// openCounters opens every node's datapath and probe SNAT pins for
// reading (the agents own them; reading takes no lock).
func (d *demo) openCounters() error {
	quiet := slog.New(slog.DiscardHandler)
	d.dp, d.probes = map[*nodelab.Node]*datapath.Loader{}, map[*nodelab.Node]*probesnat.Loader{}
	for _, n := range d.cluster.Nodes {
		dp, err := datapath.New(datapath.Config{Root: n.BPFRoot, Logger: quiet})
		if err != nil {
			return fmt.Errorf("open %s datapath pins: %w", n.Name, err)
		}
		ps, err := probesnat.New(probesnat.Config{Root: n.BPFRoot, Netns: n.NS, Logger: quiet})
		if err != nil {
			return fmt.Errorf("open %s probe snat pins: %w", n.Name, err)
		}
		d.onCleanup(n.Name+" pin readers", ps.Close)
		d.dp[n], d.probes[n] = dp, ps
	}
	return nil
}

func probeKey(p *pod) string { return fmt.Sprintf("probe snat %s (%s)", p.Name, p.HostVeth) }

// readCounters reads the mesh pods' datapath counters and their host
// veths' probe SNAT counters, keyed by what they count.
func (d *demo) readCounters() (map[string]any, error) {
	out := map[string]any{}
	for _, p := range d.pods {
		if !p.Mesh {
			continue
		}
		st, err := d.dp[p.Node].Get(p.UID)
		if err != nil {
			return nil, err
		}
		out["datapath "+p.Name] = st.Counters
		ps, err := d.probes[p.Node].Get(p.HostVeth)
		if err != nil {
			return nil, err
		}
		out[probeKey(p)] = ps.Counters
	}
	return out, nil
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

// counterFields lists every uint64 field of a counters struct
// (datapath.Counters, probesnat.Counters) in order, with the JSON names
// bpftool and ambpfctl use, so a counter added there shows up here
// without a change.
func counterFields(c any) []counterField {
	v := reflect.ValueOf(c)
	if v.Kind() != reflect.Struct {
		return nil
	}
	out := make([]counterField, 0, v.NumField())
	for i := range v.NumField() {
		if v.Field(i).Kind() != reflect.Uint64 {
			continue
		}
		name, _, _ := strings.Cut(v.Type().Field(i).Tag.Get("json"), ",")
		out = append(out, counterField{name, v.Field(i).Uint()})
	}
	return out
}

// fieldValue is the counter called name, 0 when there is none.
func fieldValue(c any, name string) uint64 {
	for _, f := range counterFields(c) {
		if f.name == name {
			return f.value
		}
	}
	return 0
}

// formatCounters prints every counter as name=value.
func formatCounters(c any) string {
	var parts []string
	for _, f := range counterFields(c) {
		parts = append(parts, fmt.Sprintf("%s=%d", f.name, f.value))
	}
	return strings.Join(parts, " ")
}

// formatDelta prints the counters that moved from before to after as
// name+n; "" when none did.
func formatDelta(before, after any) string {
	var parts []string
	for _, f := range counterFields(after) {
		if b := fieldValue(before, f.name); f.value != b {
			parts = append(parts, fmt.Sprintf("%s+%d", f.name, f.value-b))
		}
	}
	return strings.Join(parts, " ")
}
