// Command benchreport runs the side-by-side capture benchmarks of
// hack/bench several times, rotating the order of the mechanisms between
// repetitions, and writes the medians and their ratios to
// docs/BENCHMARKS.md (between the benchreport markers; the rest of the
// file is left as it is).
//
// Run it as root from anywhere in the module:
//
//	go run ./hack/bench/cmd/benchreport [-count 5] [-benchtime 1s] [-cpus 1]
//
// With -suite mesh it runs hack/bench/mesh instead (the whole mesh path
// through the real agent and proxy binaries, rows none, pass, mesh-h2,
// mesh-h3 and the reference relays relay-tcp and relay-tls, rotated by
// -rows), unpinned (the benchmark pins its own
// rows), into its own section of the report. With -suite scale it runs
// the node-scale benchmarks of hack/bench (BenchmarkScale*: hundreds of
// pods, enrolment at 1/100/250 pods, a burst of 100, BPF memory), once and
// unpinned by default, into a third section.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// config is what the flags set.
type config struct {
	suite     string
	count     int
	benchtime string
	bench     string
	cpus      string
	out       string
}

func main() {
	var cfg config
	flag.StringVar(&cfg.suite, "suite", "capture", "capture (hack/bench: none/iptables/ebpf), mesh (hack/bench/mesh: none/pass/mesh-h2/mesh-h3) or scale (hack/bench BenchmarkScale*: node scale)")
	flag.IntVar(&cfg.count, "count", 5, "repetitions; each runs every benchmark once, mechanisms in rotated order")
	flag.StringVar(&cfg.benchtime, "benchtime", "1s", "go test -benchtime of each benchmark run")
	flag.StringVar(&cfg.bench, "bench", ".", "go test -bench pattern")
	flag.StringVar(&cfg.cpus, "cpus", "1", "taskset CPU list the benchmarks run on (empty: no pinning)")
	flag.StringVar(&cfg.out, "out", "docs/BENCHMARKS.md", "report to write (a relative path is relative to the module root)")
	flag.Parse()
	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
	switch cfg.suite {
	case "mesh":
		// Defaults of the mesh suite, unless given: fixed iteration
		// counts (one iperf3 run per stream row) and no outer pinning.
		if !set["count"] {
			cfg.count = 3
		}
		if !set["benchtime"] {
			cfg.benchtime = "5000x"
		}
		if !set["cpus"] {
			cfg.cpus = ""
		}
	case "scale":
		// A few minutes per repetition; a burst is as parallel as the
		// machine allows, so no pinning.
		if !set["count"] {
			cfg.count = 1
		}
		if !set["cpus"] {
			cfg.cpus = ""
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
}

// suite is one family of benchmarks: its package, the base order of its
// mechanisms (rotated by one per repetition, passed as -<arg>=...), and
// the markers of its section in the report.
type suite struct {
	pkg, arg   string
	mechanisms []string
	begin, end string
	// bench selects the suite's benchmarks among those -bench selects
	// (all when empty); skip leaves some out.
	bench, skip string
}

var suites = map[string]suite{
	"capture": {pkg: "./hack/bench/", arg: "mechs", mechanisms: []string{"none", "iptables", "ebpf"},
		begin: beginMarker, end: endMarker, skip: scaleBench},
	"scale": {pkg: "./hack/bench/", arg: "mechs", mechanisms: []string{"none", "iptables", "ebpf"},
		begin: "<!-- benchreport:scale:begin: generated, edits inside are overwritten -->", end: "<!-- benchreport:scale:end -->",
		bench: scaleBench},
	"mesh": {pkg: "./hack/bench/mesh/", arg: "rows", mechanisms: []string{"none", "pass", "mesh-h2", "mesh-h3", "relay-tcp", "relay-tls"},
		begin: "<!-- benchreport:mesh:begin: generated, edits inside are overwritten -->", end: "<!-- benchreport:mesh:end -->"},
}

func rotate(s []string, n int) []string {
	n %= len(s)
	return append(append([]string(nil), s[n:]...), s[:n]...)
}

// scaleBench selects the node-scale benchmarks, which set up hundreds of
// pods and so run as a suite of their own.
const scaleBench = "^BenchmarkScale"

// goTestArgs is the go test command line of one repetition.
func goTestArgs(cfg config, su suite, order []string) []string {
	bench := cfg.bench
	if su.bench != "" && bench == "." {
		bench = su.bench
	}
	args := []string{"test", "-run", "^$", "-bench", bench}
	if su.skip != "" {
		args = append(args, "-skip", su.skip)
	}
	args = append(args, "-benchtime", cfg.benchtime, "-count", "1", "-timeout", "30m")
	if cfg.cpus != "" {
		args = append(args, "-exec", "taskset -c "+cfg.cpus)
	}
	return append(args, su.pkg, "-args", "-"+su.arg+"="+strings.Join(order, ","))
}

func run(ctx context.Context, cfg config) error {
	if cfg.count < 1 {
		return errors.New("-count must be at least 1")
	}
	su, ok := suites[cfg.suite]
	if !ok {
		return fmt.Errorf("-suite %q: want capture, mesh or scale", cfg.suite)
	}
	root, err := moduleRoot(ctx)
	if err != nil {
		return err
	}
	loadBefore := loadAvg()
	start := time.Now()
	s := samples{}
	var raw bytes.Buffer
	for i := range cfg.count {
		order := rotate(su.mechanisms, i)
		args := goTestArgs(cfg, su, order)
		fmt.Fprintf(os.Stderr, "== repetition %d/%d: go %s\n", i+1, cfg.count, shellJoin(args))
		cmd := exec.CommandContext(ctx, "go", args...)
		cmd.Dir = root
		var out bytes.Buffer
		cmd.Stdout = io.MultiWriter(&out, os.Stderr)
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("repetition %d: go test: %w", i+1, err)
		}
		rs, err := parse(bytes.NewReader(out.Bytes()))
		if err != nil {
			return fmt.Errorf("repetition %d: %w", i+1, err)
		}
		if len(rs) == 0 {
			return fmt.Errorf("repetition %d: no benchmark results (not root?)", i+1)
		}
		s.add(rs)
		fmt.Fprintf(&raw, "# repetition %d, -%s=%s\n", i+1, su.arg, strings.Join(order, ","))
		for _, line := range strings.Split(out.String(), "\n") {
			if strings.HasPrefix(line, "Benchmark") {
				raw.WriteString(line + "\n")
			}
		}
	}

	var sec bytes.Buffer
	fmt.Fprintf(&sec, "Generated by `hack/bench/cmd/benchreport` on %s in %s.\n\n",
		start.UTC().Format("2006-01-02 15:04 MST"), time.Since(start).Round(time.Second))
	fmt.Fprintf(&sec, "Machine: Linux %s, %s, %d cores, %s; load average %s before, %s after.\n\n",
		kernel(), cpuModel(), runtime.NumCPU(), goVersion(ctx), loadBefore, loadAvg())
	fmt.Fprintf(&sec, "Command (as root, from the module root):\n\n    %s\n\n", commandLine(cfg))
	fmt.Fprintf(&sec, "which ran %d repetitions of\n\n    go %s\n\n", cfg.count, shellJoin(goTestArgs(cfg, su, su.mechanisms)))
	fmt.Fprintf(&sec, "with `-%s` rotated by one per repetition.", su.arg)
	fmt.Fprintf(&sec, " Each cell is the median of the %d repetitions, "+
		"± half their range relative to the median; ratios are of the medians. "+
		"Higher is better for `conn/s` and `Gb/s`, lower for everything else.\n\n", cfg.count)
	renderTables(&sec, s)
	fmt.Fprintf(&sec, "<details><summary>Raw benchmark lines</summary>\n\n```\n%s```\n\n</details>\n", raw.String())

	path := cfg.out
	if !filepath.IsAbs(path) {
		path = filepath.Join(root, path)
	}
	if err := updateDoc(path, su.begin, su.end, sec.String()); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "== wrote %s\n", path)
	return nil
}

// commandLine is the benchreport invocation that reproduces this run.
func commandLine(cfg config) string {
	args := []string{"go", "run", "./hack/bench/cmd/benchreport"}
	if cfg.suite != "capture" {
		args = append(args, "-suite", cfg.suite)
	}
	args = append(args, "-count", fmt.Sprint(cfg.count), "-benchtime", cfg.benchtime, "-cpus", cfg.cpus)
	if cfg.bench != "." {
		args = append(args, "-bench", cfg.bench)
	}
	return shellJoin(args)
}

// shellJoin quotes what a shell would otherwise split or expand.
func shellJoin(args []string) string {
	out := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t'\"$^*?[]|&;<>()\\") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		out[i] = a
	}
	return strings.Join(out, " ")
}

func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside a Go module: run from the ambpf checkout")
	}
	root := filepath.Dir(mod)
	if _, err := os.Stat(filepath.Join(root, "hack", "bench")); err != nil {
		return "", fmt.Errorf("module at %s has no hack/bench: %w", root, err)
	}
	return root, nil
}

// Markers delimiting the generated part of the report.
const (
	beginMarker = "<!-- benchreport:begin: generated, edits inside are overwritten -->"
	endMarker   = "<!-- benchreport:end -->"
)

// updateDoc replaces the generated section of the report at path, or
// appends one (creating the file with a title if needed).
func updateDoc(path, beginMarker, endMarker, section string) error {
	block := beginMarker + "\n" + section + endMarker + "\n"
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("read %s: %w", path, err)
	}
	doc := string(old)
	b, e := strings.Index(doc, beginMarker), strings.Index(doc, endMarker)
	switch {
	case b >= 0 && e > b:
		doc = doc[:b] + block + doc[e+len(endMarker):]
		doc = strings.Replace(doc, endMarker+"\n\n", endMarker+"\n", 1)
	case doc == "":
		doc = "# Benchmarks\n\n" + block
	default:
		doc = strings.TrimRight(doc, "\n") + "\n\n" + block
	}
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func kernel() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func goVersion(ctx context.Context) string {
	out, err := exec.CommandContext(ctx, "go", "env", "GOVERSION").Output()
	if err != nil {
		return runtime.Version()
	}
	return strings.TrimSpace(string(out))
}

// loadAvg is the 1-minute load average: other jobs on the machine skew
// every number, and this says how busy it was.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}
