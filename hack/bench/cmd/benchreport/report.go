package main

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// result is one benchmark line: BenchmarkConnect/out/ebpf -> group
// "Connect/out", mech "ebpf", and its metrics by unit.
type result struct {
	group, mech string
	metrics     map[string]float64
}

// benchLine matches `BenchmarkName[-procs]  <iterations>  <value unit>...`.
var benchLine = regexp.MustCompile(`^Benchmark(\S+?)(?:-\d+)?\s+(\d+)\s+(.*)$`)

// parse reads `go test -bench` output and returns its benchmark results;
// other lines (goos, PASS, logs) are skipped.
func parse(r io.Reader) ([]result, error) {
	var out []result
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		m := benchLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		i := strings.LastIndex(m[1], "/")
		if i < 0 {
			return nil, fmt.Errorf("benchmark %q has no mechanism sub-benchmark", m[1])
		}
		res := result{group: m[1][:i], mech: m[1][i+1:], metrics: map[string]float64{}}
		fields := strings.Fields(m[3])
		if len(fields)%2 != 0 {
			return nil, fmt.Errorf("odd value/unit fields in %q", sc.Text())
		}
		for j := 0; j < len(fields); j += 2 {
			v, err := strconv.ParseFloat(fields[j], 64)
			if err != nil {
				return nil, fmt.Errorf("value %q in %q: %w", fields[j], sc.Text(), err)
			}
			res.metrics[fields[j+1]] = v
		}
		out = append(out, res)
	}
	return out, sc.Err()
}

// samples are all repetitions' values: group -> mech -> unit -> values.
type samples map[string]map[string]map[string][]float64

func (s samples) add(rs []result) {
	for _, r := range rs {
		if s[r.group] == nil {
			s[r.group] = map[string]map[string][]float64{}
		}
		if s[r.group][r.mech] == nil {
			s[r.group][r.mech] = map[string][]float64{}
		}
		for unit, v := range r.metrics {
			s[r.group][r.mech][unit] = append(s[r.group][r.mech][unit], v)
		}
	}
}

// median of vs (not modified); NaN when empty.
func median(vs []float64) float64 {
	if len(vs) == 0 {
		return math.NaN()
	}
	c := slices.Clone(vs)
	slices.Sort(c)
	n := len(c)
	if n%2 == 1 {
		return c[n/2]
	}
	return (c[n/2-1] + c[n/2]) / 2
}

// spread is half the range of vs relative to its median, in percent: a
// quick sign of how noisy a cell is.
func spread(vs []float64) float64 {
	m := median(vs)
	if len(vs) < 2 || m == 0 {
		return 0
	}
	return (slices.Max(vs) - slices.Min(vs)) / 2 / math.Abs(m) * 100
}

// Display order of mechanisms, groups and metrics; anything unknown is
// shown after these, sorted.
var (
	mechOrder  = []string{"none", "iptables", "iptables-restore", "ebpf", "pass", "mesh-h2", "mesh-h3", "relay-tcp", "relay-tls", "ebpf-1pod", "ebpf-250pods"}
	groupOrder = []string{"Connect/out", "Connect/in", "Request/out", "Request/in", "Enroll",
		"Mesh/Stream", "Mesh/RRPinned", "Mesh/RR", "Mesh/Connect",
		"ScaleEnroll/with-1", "ScaleEnroll/with-100", "ScaleEnroll/with-250", "ScaleEnroll/burst-100", "ScaleRequest", "ScaleProcesses"}
	unitOrder = []string{
		"conn/s", "us/op", "p50-us", "p99-us", "enroll-us", "unenroll-us",
		"cpu-us/conn", "cpu-us/req", "cpu-us/cycle",
		"cpuset-us/conn", "cpuset-us/req", "cpuset-us/cycle", "ct/conn",
		"Gb/s", "proxy-cpu-ms/GB", "machine-cpu-ms/GB", "busy-cpus", "proxy-cpu-us/req", "proxy-cpu-us/conn",
		"enroll-p50-us", "enroll-p99-us", "unenroll-p50-us", "unenroll-p99-us",
		"burst-enroll-ms", "burst-unenroll-ms", "cpu-us/pod",
		"bpf-kib/pod", "bpf-kib-total", "bpf-kib-node",
		"agent-rss-mib", "proxy-rss-mib",
	}
	unitHelp = map[string]string{
		"conn/s":            "connections per second (connect + 64 B echo + close)",
		"us/op":             "mean time per op, µs",
		"p50-us":            "median round trip, µs",
		"p99-us":            "99th percentile round trip, µs",
		"enroll-us":         "enrol one pod, µs (wall)",
		"unenroll-us":       "remove it again, µs (wall)",
		"cpu-us/conn":       "CPU of the test process per connection, µs",
		"cpu-us/req":        "CPU of the test process per request, µs",
		"cpu-us/cycle":      "CPU of the process and its children per enrol+remove, µs",
		"cpuset-us/conn":    "busy time of the pinned CPUs per connection, µs (all processes)",
		"cpuset-us/req":     "busy time of the pinned CPUs per request, µs (all processes)",
		"cpuset-us/cycle":   "busy time of the pinned CPUs per cycle, µs (all processes)",
		"ct/conn":           "conntrack entries left in the captured pod per connection",
		"Gb/s":              "one iperf3 stream, Gb/s",
		"proxy-cpu-ms/GB":   "proxy CPU (all threads, both hops) per GB moved, ms",
		"machine-cpu-ms/GB": "busy time of all CPUs (iperf3, proxy, softirqs, anything else) per GB moved, ms",
		"busy-cpus":         "CPUs kept busy during the stream (all of them: CPU-bound)",
		"proxy-cpu-us/req":  "proxy CPU (all threads, both hops) per request, µs",
		"proxy-cpu-us/conn": "proxy CPU (all threads, both hops) per connection, µs",
		"enroll-p50-us":     "enrol one pod, median, µs (wall)",
		"enroll-p99-us":     "enrol one pod, 99th percentile, µs (wall)",
		"unenroll-p50-us":   "remove it again, median, µs (wall)",
		"unenroll-p99-us":   "remove it again, 99th percentile, µs (wall)",
		"burst-enroll-ms":   "enrol all the burst's pods at once, ms (wall)",
		"burst-unenroll-ms": "remove them all at once, ms (wall)",
		"cpu-us/pod":        "CPU of the process and its children per pod of the burst, µs",
		"bpf-kib/pod":       "kernel memory of all BPF maps and programs divided by the pods, KiB",
		"bpf-kib-total":     "kernel memory of all BPF maps and programs, KiB",
		"bpf-kib-node":      "of which the node's shared programs and maps, KiB",
		"agent-rss-mib":     "resident memory of the ambpf-agent process (VmRSS), MiB",
		"proxy-rss-mib":     "resident memory of the ambpf-proxy process (VmRSS), MiB",
	}
	groupHelp = map[string]string{
		"Connect/out":           "Connection setup, outbound: client in the captured pod A -> server in R",
		"Connect/in":            "Connection setup, inbound: client in R -> server in the captured pod A",
		"Request/out":           "Request latency on one connection, outbound (64 B ping-pong)",
		"Request/in":            "Request latency on one connection, inbound (64 B ping-pong)",
		"Enroll":                "Enrolment: enrol a pod and remove it again (another pod stays enrolled)",
		"Mesh/Stream":           "Mesh path: one-stream throughput (iperf3)",
		"Mesh/RRPinned":         "Mesh path: 64 B request/response, client, server and proxy on one CPU",
		"Mesh/RR":               "Mesh path: 64 B request/response, unpinned",
		"Mesh/Connect":          "Mesh path: connect + 64 B echo + close, one at a time",
		"ScaleEnroll/with-1":    "Node scale: enrol and remove a pod with 1 pod already enrolled",
		"ScaleEnroll/with-100":  "Node scale: enrol and remove a pod with 100 pods already enrolled",
		"ScaleEnroll/with-250":  "Node scale: enrol and remove a pod with 250 pods already enrolled (and the BPF memory then)",
		"ScaleEnroll/burst-100": "Node scale: 100 pods enrolled all at once, then removed all at once",
		"ScaleRequest":          "Node scale: 64 B request latency through the eBPF capture, 1 vs 250 pods enrolled",
		"ScaleProcesses":        "Node scale: the real agent and proxy with 1 vs 250 pods enrolled through the agent (us/op: the agent's status call)",
	}
)

// ordered returns keys sorted by their position in pref, unknown ones last
// in lexical order.
func ordered(keys []string, pref []string) []string {
	rank := func(k string) int {
		if i := slices.Index(pref, k); i >= 0 {
			return i
		}
		return len(pref)
	}
	slices.SortFunc(keys, func(a, b string) int {
		if ra, rb := rank(a), rank(b); ra != rb {
			return ra - rb
		}
		return strings.Compare(a, b)
	})
	return keys
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

// ratioPairs are the comparisons shown, when both mechanisms are present:
// each capture against no capture, eBPF against the iptables variants, and
// the proxy against the reference relays.
var ratioPairs = [][2]string{
	{"iptables", "none"}, {"ebpf", "none"}, {"ebpf", "iptables"}, {"ebpf", "iptables-restore"},
	{"pass", "none"}, {"mesh-h2", "none"}, {"mesh-h3", "none"}, {"mesh-h3", "mesh-h2"},
	// The mesh suite's reference relays (hack/bench/relay): their own
	// cost, and how far the proxy's rows are from them.
	{"relay-tcp", "none"}, {"relay-tls", "none"}, {"pass", "relay-tcp"}, {"mesh-h2", "relay-tls"},
	{"ebpf-250pods", "ebpf-1pod"},
}

// renderTables writes one markdown table per group: the median of each
// metric per mechanism (with its spread), then the ratios of the medians.
func renderTables(w io.Writer, s samples) {
	for _, g := range ordered(keys(s), groupOrder) {
		byMech := s[g]
		// ns/op is shown in µs, which reads better at these scales.
		for _, units := range byMech {
			if ns, ok := units["ns/op"]; ok {
				us := make([]float64, len(ns))
				for i, v := range ns {
					us[i] = v / 1000
				}
				units["us/op"] = us
				delete(units, "ns/op")
			}
		}
		mechs := ordered(keys(byMech), mechOrder)
		var pairs [][2]string
		for _, p := range ratioPairs {
			if byMech[p[0]] != nil && byMech[p[1]] != nil {
				pairs = append(pairs, p)
			}
		}
		unitSet := map[string]bool{}
		for _, units := range byMech {
			for u := range units {
				unitSet[u] = true
			}
		}
		title := groupHelp[g]
		if title == "" {
			title = g
		}
		fmt.Fprintf(w, "### %s\n\n", title)
		fmt.Fprintf(w, "| metric | %s |", strings.Join(mechs, " | "))
		for _, p := range pairs {
			fmt.Fprintf(w, " %s / %s |", p[0], p[1])
		}
		fmt.Fprintf(w, "\n|---|%s", strings.Repeat("---:|", len(mechs)+len(pairs)))
		fmt.Fprintln(w)
		for _, u := range ordered(keys(unitSet), unitOrder) {
			label := u
			if h := unitHelp[u]; h != "" {
				label = fmt.Sprintf("`%s` %s", u, h)
			}
			fmt.Fprintf(w, "| %s |", label)
			for _, m := range mechs {
				vs := byMech[m][u]
				if len(vs) == 0 {
					fmt.Fprint(w, " – |")
					continue
				}
				fmt.Fprintf(w, " %s ±%.0f%% |", num(median(vs)), spread(vs))
			}
			for _, p := range pairs {
				a, b := median(byMech[p[0]][u]), median(byMech[p[1]][u])
				// The proxy's CPU where no proxy is on the path is
				// noise, not a base to compare against.
				if strings.HasPrefix(u, "proxy-cpu") && p[1] == "none" {
					b = math.NaN()
				}
				if math.IsNaN(a) || math.IsNaN(b) || b == 0 {
					fmt.Fprint(w, " – |")
					continue
				}
				fmt.Fprintf(w, " %.2f× |", a/b)
			}
			fmt.Fprintln(w)
		}
		fmt.Fprintln(w)
	}
}

// num formats a value with about three significant digits.
func num(v float64) string {
	switch a := math.Abs(v); {
	case a >= 1000:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	default:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
}
