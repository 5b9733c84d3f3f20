//go:build linux

package mesh

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/hack/bench/benchproc"
	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/profiling"
)

var (
	rowsFlag = flag.String("rows", strings.Join(allRows, ","),
		"rows to compare, in run order: none, pass, mesh-h2, mesh-h3, relay-tcp, relay-tls")
	streamTime = flag.Duration("stream-time", 3*time.Second, "length of each iperf3 run")
	pinCPU     = flag.Int("pin-cpu", 0, "the CPU the pinned request/response rows run on")
	profileDir = flag.String("profile", "", "directory the proxy writes a CPU profile and runtime trace to (AMBPF_DEBUG_PROFILE)")
	proxyEnv   = flag.String("proxy-env", "", "extra environment of the proxy, comma-separated (e.g. GOMAXPROCS=1)")
	keepLogs   = flag.Bool("logs", false, "print the agent's and proxy's logs at the end")
	attachFlag = flag.String("attach", "", "command run around each measured loop, {pid} {bench} {row} replaced "+
		"(e.g. 'strace -c -f -o /tmp/st-{bench}-{row}.txt -p {pid}' or 'perf record -g -o /tmp/{bench}-{row}.data -p {pid}'); "+
		"it gets SIGINT when the loop ends")
)

// attach starts -attach for one measured loop and returns what stops it.
func attach(b *testing.B, w *world, bench, row string) (stop func()) {
	if *attachFlag == "" {
		return func() {}
	}
	line := strings.NewReplacer("{pid}", strconv.Itoa(w.hop(row).Pid()), "{bench}", bench, "{row}", row).Replace(*attachFlag)
	f := strings.Fields(line)
	cmd := exec.Command(f[0], f[1:]...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatalf("-attach %s: %v", line, err)
	}
	time.Sleep(500 * time.Millisecond) // strace and perf attach asynchronously; a measuring aid only
	return func() {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
	}
}

// Rows: how pod A's connection to its server goes.
const (
	rowNone   = "none"    // client and server outside the mesh
	rowPass   = "pass"    // client enrolled, server outside: passthrough
	rowMeshH2 = "mesh-h2" // both enrolled: HBONE over HTTP/2
	rowMeshH3 = "mesh-h3" // both enrolled, server's namespace on HTTP/3

	// The reference rows: hack/bench/relay, the least a user-space proxy
	// must do, between pods outside the mesh (see world).
	rowRelayTCP = "relay-tcp" // a splicing TCP relay: pass's floor
	rowRelayTLS = "relay-tls" // plaintext, TLS, plaintext in one process: mesh-h2's floor
)

var allRows = []string{rowNone, rowPass, rowMeshH2, rowMeshH3, rowRelayTCP, rowRelayTLS}

const (
	echoPorts     = 8 // the connect loop rotates through them (TIME_WAIT spread)
	firstEchoPort = 8000
	iperfPort     = 5201
	msgSize       = 64
	opTimeout     = 2 * time.Second
	warmup        = 50
)

// world is the topology of the run: pods on one bridge, the real
// ambpf-agent and ambpf-proxy binaries in the node namespace.
//
//	pod0 (not enrolled) -> pod1 (not enrolled)       none
//	pod2 (enrolled)     -> pod1                      pass
//	pod2                -> pod3 (enrolled, ns-b)     mesh-h2
//	pod2                -> pod4 (enrolled, ns-h3)    mesh-h3
//	pod0 -> relay in pod0 -> pod1                    relay-tcp, relay-tls
//
// The relay rows have the same legs as pass and mesh-h2: an app's
// connection to a proxy inside the app's pod (over lo, where the
// captured one is redirected on the pod's eth0), for relay-tls a TLS
// connection (over lo in pod0, where mesh-h2's crosses the bridge), and a
// connection to the server (over the bridge, where mesh-h2's inbound
// proxy reaches its app inside the server's pod).
type world struct {
	lab   *nettest.Topology
	proxy *benchproc.Process
	agent *benchproc.Process
	relay *benchproc.Process // hack/bench/relay, in pod0
}

// Port offsets of the relay rows' listeners in pod0 (on 127.0.0.1): the
// relay of server port p listens on p+offset.
const (
	relayTCPOffset = 10000
	relayTLSOffset = 20000
	relayMidOffset = 30000 // relay-tls's TLS listener
)

// target is where one row's client connects to for a server port.
type target struct {
	client *nettest.Pod
	host   string
	offset int
}

func (t target) addr(port int) string {
	return net.JoinHostPort(t.host, strconv.Itoa(port+t.offset))
}

// route is one row's client pod and where it connects.
func (w *world) route(row string) target {
	pod := func(client, server int) target {
		return target{client: w.lab.Pod(client), host: w.lab.Pod(server).IPv4.String()}
	}
	switch row {
	case rowNone:
		return pod(0, 1)
	case rowPass:
		return pod(2, 1)
	case rowMeshH2:
		return pod(2, 3)
	case rowMeshH3:
		return pod(2, 4)
	case rowRelayTCP:
		return target{client: w.lab.Pod(0), host: "127.0.0.1", offset: relayTCPOffset}
	case rowRelayTLS:
		return target{client: w.lab.Pod(0), host: "127.0.0.1", offset: relayTLSOffset}
	}
	panic("unknown row " + row)
}

// hop is the process between the row's client and server whose CPU the
// row reports: the relay for the relay rows, else the proxy (idle in
// none's).
func (w *world) hop(row string) *benchproc.Process {
	if row == rowRelayTCP || row == rowRelayTLS {
		return w.relay
	}
	return w.proxy
}

func rows(tb testing.TB) []string {
	var out []string
	for r := range strings.SplitSeq(*rowsFlag, ",") {
		r = strings.TrimSpace(r)
		if r == "" {
			continue
		}
		if !slices.Contains(allRows, r) {
			tb.Fatalf("-rows: unknown row %q (want %v)", r, allRows)
		}
		out = append(out, r)
	}
	return out
}

func newWorld(b *testing.B) *world {
	b.Helper()
	if os.Geteuid() != 0 {
		b.Skip("mesh bench: network namespaces, bpffs and the agent need root")
	}
	for _, tool := range []string{"iperf3", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Fatalf("%s is needed (apt-get install -y %s)", tool, tool)
		}
	}
	ae := agenttest.NewEnv(b)
	w := &world{lab: nettest.NewTopology(b, 5)}
	bins := benchproc.Build(b, "ambpf-agent", "ambpf-proxy")
	w.agent = benchproc.Start(b, w.lab.Node, ae.Dir, nil, filepath.Join(bins, "ambpf-agent"),
		"--bpf-root", ae.Config.BPFRoot, "--state-dir", ae.Config.StateDir,
		"--zds-socket", ae.Config.ZDSPath, "--api-socket", ae.Config.APISocket,
		"--ready-addr", "off", "--probe-snat=false")
	agenttest.WaitFor(b, 20*time.Second, "agent ready", func() bool {
		st, err := ae.Client.Status(context.Background())
		return err == nil && st.Ready && !w.agent.Exited()
	})
	var env []string
	for kv := range strings.SplitSeq(*proxyEnv, ",") {
		if kv != "" {
			env = append(env, kv)
		}
	}
	if *profileDir != "" {
		env = append(env, profiling.EnvVar+"="+*profileDir)
	}
	w.proxy = benchproc.Start(b, w.lab.Node, ae.Dir, env, filepath.Join(bins, "ambpf-proxy"),
		"--zds-path", ae.Config.ZDSPath, "--state-dir", filepath.Join(ae.Dir, "proxy"),
		"--metrics-addr", "127.0.0.1:15020", "--ready-addr", "off", "--log-level", "warn",
		"--hbone-h3-serve", "--hbone-h3-namespaces", "ns-h3")
	id := agenttest.RandomID()
	for _, p := range []struct {
		pod int
		ns  string
	}{{2, "ns-a"}, {3, "ns-b"}, {4, "ns-h3"}} {
		pd := w.lab.Pod(p.pod)
		uid := fmt.Sprintf("%s-%s", pd.Name, id)
		req := agentapi.EnrollRequest{UID: uid, Name: pd.Name, Namespace: p.ns, ServiceAccount: "sa", Netns: pd.NSPath}
		if _, err := ae.Client.Enroll(context.Background(), req); err != nil {
			b.Fatalf("enroll %s: %v", pd.Name, err)
		}
		b.Cleanup(func() { ae.Client.Unenroll(context.Background(), uid) })
		agenttest.WaitFor(b, 20*time.Second, pd.Name+" enabled", func() bool {
			ps, err := ae.Client.Pod(context.Background(), uid)
			return err == nil && ps.State == agentapi.StateEnabled
		})
	}
	for _, i := range []int{1, 3, 4} {
		pd := w.lab.Pod(i)
		for p := range echoPorts {
			ln, err := pd.Listen("tcp", ":"+strconv.Itoa(firstEchoPort+p))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { ln.Close() })
			go serveEcho(ln)
		}
		benchproc.Start(b, &pd.Netns, ae.Dir, nil, "iperf3", "-s", "-p", strconv.Itoa(iperfPort))
	}
	var relayArgs []string
	server := w.lab.Pod(1).IPv4.String()
	for _, p := range append([]int{iperfPort}, echoPortList()...) {
		to := net.JoinHostPort(server, strconv.Itoa(p))
		local := func(off int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p+off)) }
		relayArgs = append(relayArgs, "-tcp", local(relayTCPOffset)+"="+to,
			"-tls", local(relayTLSOffset)+"="+local(relayMidOffset)+"="+to)
	}
	relayBin := benchproc.BuildPackages(b, "./hack/bench/relay")
	w.relay = benchproc.Start(b, &w.lab.Pod(0).Netns, ae.Dir, nil, filepath.Join(relayBin, "relay"), relayArgs...)
	// Every route works, and over the transport its row names.
	for _, row := range allRows {
		waitEcho(b, w, row)
	}
	return w
}

// waitEcho waits until one connect+echo on row's route succeeds (the
// pod listeners of the proxy open asynchronously after enrolment).
func waitEcho(b *testing.B, w *world, row string) {
	b.Helper()
	t := w.route(row)
	addr := t.addr(firstEchoPort)
	msg, buf := make([]byte, msgSize), make([]byte, msgSize)
	var last error
	for end := time.Now().Add(20 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if last = connectEcho(t.client, addr, msg, buf); last == nil {
			return
		}
	}
	b.Fatalf("%s: no echo from %s: %v", row, addr, last)
}

// echoPortList is the echo servers' ports.
func echoPortList() []int {
	ps := make([]int, echoPorts)
	for i := range ps {
		ps[i] = firstEchoPort + i
	}
	return ps
}

func serveEcho(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			buf := make([]byte, 16<<10)
			for {
				n, err := c.Read(buf)
				if n > 0 {
					if _, werr := c.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
}

func dial(client *nettest.Pod, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	return client.Dial(ctx, "tcp", addr)
}

func connectEcho(client *nettest.Pod, addr string, msg, buf []byte) error {
	c, err := dial(client, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(opTimeout))
	if _, err := c.Write(msg); err != nil {
		return err
	}
	_, err = io.ReadFull(c, buf)
	return err
}

// BenchmarkMesh measures every row, the rows of each metric one after
// the other (interleaved), against one set of binaries:
//
//   - Stream: one iperf3 stream, client pod to server pod (Gb/s and the
//     proxy's CPU per GB moved);
//   - RRPinned / RR: 64 B request/response on one connection with the
//     client, server and proxy threads all on one CPU, and unpinned
//     (p50, p99, proxy CPU per request);
//   - Connect: connect + 64 B echo + close, one at a time (conn/s, proxy
//     CPU per connection).
//
// The proxy's CPU is the on-CPU time of all its threads
// (/proc/<pid>/task/*/schedstat): both hops of a mesh row, one of pass.
func BenchmarkMesh(b *testing.B) {
	w := newWorld(b)
	rs := rows(b)
	for _, row := range rs {
		b.Run("Stream/"+row, func(b *testing.B) { benchStream(b, w, row) })
	}
	for _, row := range rs {
		b.Run("RRPinned/"+row, func(b *testing.B) { benchRR(b, w, row, true) })
	}
	for _, row := range rs {
		b.Run("RR/"+row, func(b *testing.B) { benchRR(b, w, row, false) })
	}
	for _, row := range rs {
		// relay-tls dials a TLS connection per connection, where the
		// proxy opens a stream on a pooled one: not a floor for this.
		if row != rowRelayTLS {
			b.Run("Connect/"+row, func(b *testing.B) { benchConnect(b, w, row) })
		}
	}
	if *keepLogs {
		b.Logf("proxy log:\n%s", w.proxy.Tail(100))
	}
	if w.proxy.Exited() {
		b.Fatalf("proxy exited during the run: %v", w.proxy.Err())
	}
}

func benchStream(b *testing.B, w *world, row string) {
	t := w.route(row)
	hop := w.hop(row)
	var bytes, cpu, busy float64
	secs := streamTime.Seconds()
	// One iperf3 run of -stream-time whatever b.N (it is a rate).
	b.ResetTimer()
	{
		stop := attach(b, w, "stream", row)
		defer stop()
		before := hop.CPU(b)
		busyBefore := cpuSetBusy(b)
		ctx, cancel := context.WithTimeout(context.Background(), *streamTime+30*time.Second)
		host, port, _ := net.SplitHostPort(t.addr(iperfPort))
		out, err := t.client.Exec(ctx, "iperf3", "-c", host, "-p", port,
			"-t", strconv.FormatFloat(secs, 'f', -1, 64), "-J")
		cancel()
		if err != nil {
			b.Fatalf("iperf3: %v", err)
		}
		cpu += float64(hop.CPU(b) - before)
		busy += float64(cpuSetBusy(b) - busyBefore)
		var res struct {
			End struct {
				SumReceived struct {
					Bytes float64 `json:"bytes"`
				} `json:"sum_received"`
			} `json:"end"`
		}
		if err := json.Unmarshal(out, &res); err != nil {
			b.Fatalf("iperf3 output: %v\n%s", err, out)
		}
		bytes += res.End.SumReceived.Bytes
	}
	b.StopTimer()
	b.ReportMetric(bytes*8/1e9/secs, "Gb/s")
	b.ReportMetric(cpu/1e6/(bytes/1e9), "proxy-cpu-ms/GB")
	// What moving the bytes cost the whole machine (iperf3 at both ends,
	// the proxy, softirqs, and anything else running), and how many CPUs
	// that kept busy: a row that keeps every CPU busy is CPU-bound, and
	// then its Gb/s against another row's is at most the inverse ratio
	// of their machine-cpu-ms/GB.
	b.ReportMetric(busy/1e6/(bytes/1e9), "machine-cpu-ms/GB")
	b.ReportMetric(busy/1e9/secs, "busy-cpus")
	b.ReportMetric(0, "ns/op")
}

// cpuSetBusy is benchproc.CPUSetBusy, failing b on an error.
func cpuSetBusy(b *testing.B) time.Duration {
	d, err := benchproc.CPUSetBusy()
	if err != nil {
		b.Fatal(err)
	}
	return d
}

func benchRR(b *testing.B, w *world, row string, pinned bool) {
	t := w.route(row)
	hop := w.hop(row)
	c, err := dial(t.client, t.addr(firstEchoPort))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if pinned {
		restore := pinAll(b, []int{os.Getpid(), hop.Pid()}, *pinCPU)
		defer restore()
	}
	msg, buf := make([]byte, msgSize), make([]byte, msgSize)
	rr := func() error {
		if _, err := c.Write(msg); err != nil {
			return err
		}
		_, err := io.ReadFull(c, buf)
		return err
	}
	c.SetDeadline(time.Now().Add(5 * time.Minute))
	for range warmup {
		if err := rr(); err != nil {
			b.Fatal(err)
		}
	}
	lat := make([]time.Duration, b.N)
	name := "rr"
	if pinned {
		name = "rrpinned"
	}
	stop := attach(b, w, name, row)
	before := hop.CPU(b)
	b.ResetTimer()
	for i := range b.N {
		t0 := time.Now()
		if err := rr(); err != nil {
			b.Fatal(err)
		}
		lat[i] = time.Since(t0)
	}
	b.StopTimer()
	cpu := hop.CPU(b) - before
	stop()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-us")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-us")
	b.ReportMetric(float64(cpu.Nanoseconds())/1e3/float64(b.N), "proxy-cpu-us/req")
}

func benchConnect(b *testing.B, w *world, row string) {
	t := w.route(row)
	hop := w.hop(row)
	msg, buf := make([]byte, msgSize), make([]byte, msgSize)
	addrs := make([]string, echoPorts)
	for i, p := range echoPortList() {
		addrs[i] = t.addr(p)
	}
	for i := range warmup {
		if err := connectEcho(t.client, addrs[i%echoPorts], msg, buf); err != nil {
			b.Fatal(err)
		}
	}
	stop := attach(b, w, "connect", row)
	before := hop.CPU(b)
	t0 := time.Now()
	b.ResetTimer()
	for i := range b.N {
		if err := connectEcho(t.client, addrs[i%echoPorts], msg, buf); err != nil {
			b.Fatalf("connection %d: %v", i, err)
		}
	}
	b.StopTimer()
	el := time.Since(t0)
	cpu := hop.CPU(b) - before
	stop()
	b.ReportMetric(float64(b.N)/el.Seconds(), "conn/s")
	b.ReportMetric(float64(cpu.Nanoseconds())/1e3/float64(b.N), "proxy-cpu-us/conn")
}

// pinAll sets the CPU affinity of every thread of the processes to cpu
// and returns the function that gives them all CPUs back.
func pinAll(b *testing.B, pids []int, cpu int) (restore func()) {
	b.Helper()
	var one, all unix.CPUSet
	one.Set(cpu)
	if err := unix.SchedGetaffinity(0, &all); err != nil {
		b.Fatal(err)
	}
	set := func(s *unix.CPUSet) {
		for _, pid := range pids {
			tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
			if err != nil {
				b.Fatalf("threads of %d: %v", pid, err)
			}
			for _, t := range tasks {
				tid, _ := strconv.Atoi(t.Name())
				// A thread may exit meanwhile; that is fine.
				unix.SchedSetaffinity(tid, s)
			}
		}
	}
	set(&one)
	return func() { set(&all) }
}
